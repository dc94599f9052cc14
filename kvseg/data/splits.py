"""Train, validation and test splits: the split files of a dataset folder, seeded draws, and writing them.

The official layout names its splits in ``train.txt`` and ``test.txt`` (one id, the file stem, per
line) and may add ``val.txt``; otherwise the splits are drawn from a seed. A run writes the three
lists it used into its own folder, never into the data folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvseg.data.folder import IMAGE_EXTENSIONS, Sample, preview
from kvseg.errors import SplitError
from kvseg.files import write_text

SPLIT_FILES = ("train.txt", "val.txt", "test.txt")


@dataclass(frozen=True)
class Split:
    """Train, validation and test ids, and where they came from (e.g. "split files", "seed 0")."""

    train: list[str]
    val: list[str]
    test: list[str]
    source: str

    def items(self) -> list[tuple[str, list[str]]]:
        """(name, ids) of the splits that are not empty, in the order train, val, test."""
        return [(name, ids) for name, ids in (("train", self.train), ("val", self.val), ("test", self.test)) if ids]


def read_split_file(path: Path, known: dict[str, Sample]) -> list[str]:
    """The ids listed in a split file (one per line; a file name's extension is dropped).

    The file is read as Python's ``utf-8-sig`` codec does, so the byte-order mark that Windows
    Notepad writes at the start is not part of the first id; ``\r\n`` and ``\r`` end lines as ``\n`` does.

    Raises:
        SplitError: the file is not UTF-8 text, an id has no image, or an id is listed twice (it would
            be trained or scored twice), naming the file and line.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise SplitError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected one id per "
                         "line, saved as UTF-8") from None
    ids: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
            name = Path(name).stem
        if name not in known:
            raise SplitError(f"{path}:{number}: id '{name}' has no image in images/ (expected ids of existing files)")
        if name in ids:
            raise SplitError(f"{path}:{number}: id '{name}' is listed twice (also on line {ids[name]}; expected each id once)")
        ids[name] = number
    return list(ids)


def carve_validation(train: list[str], seed: int, fraction: float, minimum: int = 0) -> tuple[list[str], list[str]]:
    """(train, val): ``fraction`` of ``train`` drawn by ``seed`` for validation, at least one id each when possible.

    ``minimum`` is a floor on the validation ids where the folder allows it: when ``train`` holds at
    least four times as many, validation gets at least ``minimum`` (on 36 validation frames, two epochs
    0.03 apart in per-image Dice cannot be told apart; the bootstrap interval in metrics.json shows it).
    """
    if fraction <= 0 or len(train) < 2:
        return list(train), []
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = round(fraction * len(train))
    if minimum and len(train) >= 4 * minimum:
        n_val = max(n_val, minimum)
    n_val = min(len(train) - 1, max(1, n_val))
    return sorted(train[i] for i in order[n_val:]), sorted(train[i] for i in order[:n_val])


def resolve_split(root: str | Path, samples: dict[str, Sample], seed: int, test_fraction: float,
                  val_fraction: float = 0.0, val_min_images: int = 0) -> Split:
    """The train/validation/test split of ``root``: its split files where present, otherwise seeded draws.

    ``train.txt`` / ``test.txt``: with only one of them, the other split is every remaining id.
    Without either, ``test_fraction`` of the ids is drawn by ``seed``. ``val.txt`` names the
    validation ids; without it, ``val_fraction`` of the training ids is drawn by ``seed``
    (:func:`carve_validation`, at least ``val_min_images`` where the folder allows). The test split never
    takes part in the validation draw.

    Raises:
        SplitError: an id in a split file has no image, an id is in two splits, or a split is empty.
    """
    root = Path(root)
    train_file, val_file, test_file = (root / name for name in SPLIT_FILES)
    if train_file.is_file() or test_file.is_file():
        train = read_split_file(train_file, samples) if train_file.is_file() else None
        test = read_split_file(test_file, samples) if test_file.is_file() else None
        if train is None:
            train = [i for i in samples if i not in set(test)]
        if test is None:
            test = [i for i in samples if i not in set(train)]
        source = "split files"
    else:
        ids = sorted(samples)
        if len(ids) < 2:
            raise SplitError(f"{root}: {len(ids)} image(s); a train/test split needs at least 2")
        order = np.random.default_rng(seed).permutation(len(ids))
        n_test = min(len(ids) - 1, max(1, round(test_fraction * len(ids))))
        test, train = sorted(ids[i] for i in order[:n_test]), sorted(ids[i] for i in order[n_test:])
        source = f"seed {seed}"
    if val_file.is_file():
        val = read_split_file(val_file, samples)
        train = [i for i in train if i not in set(val)] if not train_file.is_file() else train
    else:
        train, val = carve_validation(train, seed, val_fraction, val_min_images)
        source += f", validation drawn by seed {seed}" if val else ""
    pairs = ((("train", train), ("test", test)), (("train", train), ("val", val)), (("val", val), ("test", test)))
    for (name_a, a), (name_b, b) in pairs:
        overlap = sorted(set(a) & set(b))
        if overlap:
            raise SplitError(f"{root}: {len(overlap)} id(s) are in both {name_a} and {name_b}: {preview(overlap)}")
    if not train or not test:
        raise SplitError(f"{root}: the split leaves the {'train' if not train else 'test'} split empty")
    return Split(train, val, test, source)


def write_split(split: Split, folder: str | Path) -> None:
    """Write ``train.txt``, ``val.txt`` and ``test.txt`` into ``folder`` (a run folder, never the data folder).

    Raises:
        WriteError: a file could not be written (:func:`kvseg.files.write_text`; the previous one is kept).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in zip(SPLIT_FILES, (split.train, split.val, split.test)):
        write_text(folder / name, "".join(f"{i}\n" for i in ids))
