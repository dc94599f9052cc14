"""Reading a segmentation dataset folder: image/mask pairs, splits, and decoding files.

Two layouts are read by the same code:

* **Kvasir-Instrument**: ``ROOT/images/<id>.jpg``, ``ROOT/masks/<id>.png``, ``ROOT/train.txt`` and
  ``ROOT/test.txt`` with one id (file stem) per line.
* **Generic**: ``ROOT/images/`` and ``ROOT/masks/`` matched by file stem, any of the extensions in
  :data:`IMAGE_EXTENSIONS` on either side, masks in any mode (0/1, 0/255, RGB, JPEG with grey edges),
  images of any size, and no split files: the split is then drawn from a seed.

The PyTorch ``Dataset`` over these pairs is in :mod:`kvseg.dataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from kvseg.errors import (
    CorruptImageError,
    DatasetError,
    DatasetNotFoundError,
    EmptyDatasetError,
    MissingMaskError,
    OrphanMaskError,
    SplitError,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
SPLIT_FILES = ("train.txt", "val.txt", "test.txt")


@dataclass(frozen=True)
class Sample:
    """One image and its mask, named by the shared file stem."""

    id: str
    image: Path
    mask: Path


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


def _list_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{folder}: folder not found (expected images/ and masks/ inside the dataset root)")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if path.stem in files:
            raise DatasetError(f"{path}: two files share the stem '{path.stem}' ({files[path.stem].name}); expected one per id")
        files[path.stem] = path
    return files


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def find_samples(root: str | Path) -> dict[str, Sample]:
    """All image/mask pairs under ``root``, keyed by id (file stem), sorted by id."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: dataset folder not found (expected a folder with images/ and masks/)")
    images = _list_files(root / "images")
    masks = _list_files(root / "masks")
    if not images:
        raise EmptyDatasetError(f"{root / 'images'}: no images found (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    without_mask = sorted(set(images) - set(masks))
    if without_mask:
        raise MissingMaskError(
            f"{root / 'masks'}: no mask for {len(without_mask)} image(s): {_preview(without_mask)} "
            "(expected a mask with the same file stem)"
        )
    without_image = sorted(set(masks) - set(images))
    if without_image:
        raise OrphanMaskError(
            f"{root / 'images'}: no image for {len(without_image)} mask(s): {_preview(without_image)} "
            "(expected an image with the same file stem)"
        )
    return {stem: Sample(stem, images[stem], masks[stem]) for stem in sorted(images)}


def read_split_file(path: Path, known: dict[str, Sample]) -> list[str]:
    ids = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
            name = Path(name).stem
        if name not in known:
            raise SplitError(f"{path}:{number}: id '{name}' has no image in images/ (expected ids of existing files)")
        ids.append(name)
    return ids


def carve_validation(train: list[str], seed: int, fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): ``fraction`` of ``train`` drawn by ``seed`` for validation, at least one id each when possible."""
    if fraction <= 0 or len(train) < 2:
        return list(train), []
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = min(len(train) - 1, max(1, round(fraction * len(train))))
    return sorted(train[i] for i in order[n_val:]), sorted(train[i] for i in order[:n_val])


def resolve_split(root: str | Path, samples: dict[str, Sample], seed: int, test_fraction: float,
                  val_fraction: float = 0.0) -> Split:
    """The train/validation/test split of ``root``: its split files where present, otherwise seeded draws.

    ``train.txt`` / ``test.txt``: with only one of them, the other split is every remaining id.
    Without either, ``test_fraction`` of the ids is drawn by ``seed``. ``val.txt`` names the
    validation ids; without it, ``val_fraction`` of the training ids is drawn by ``seed``
    (:func:`carve_validation`). The test split never takes part in the validation draw.

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
        train, val = carve_validation(train, seed, val_fraction)
        source += f", validation drawn by seed {seed}" if val else ""
    pairs = ((("train", train), ("test", test)), (("train", train), ("val", val)), (("val", val), ("test", test)))
    for (name_a, a), (name_b, b) in pairs:
        overlap = sorted(set(a) & set(b))
        if overlap:
            raise SplitError(f"{root}: {len(overlap)} id(s) are in both {name_a} and {name_b}: {_preview(overlap)}")
    if not train or not test:
        raise SplitError(f"{root}: the split leaves the {'train' if not train else 'test'} split empty")
    return Split(train, val, test, source)


def write_split(split: Split, folder: str | Path) -> None:
    """Write ``train.txt``, ``val.txt`` and ``test.txt`` into ``folder`` (a run folder, never the data folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in zip(SPLIT_FILES, (split.train, split.val, split.test)):
        (folder / name).write_text("".join(f"{i}\n" for i in ids))


def _open(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()  # decode now so that a truncated file fails here
            return np.asarray(image.convert(mode))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptImageError(f"{path}: cannot decode image ({reason}); expected a readable image file") from None


def read_image(path: str | Path) -> np.ndarray:
    """The image at ``path`` as RGB uint8, shape (H, W, 3)."""
    return _open(Path(path), "RGB")


def read_mask(path: str | Path, threshold: int = 128) -> np.ndarray:
    """The mask at ``path`` as uint8 in {0, 1}, shape (H, W).

    A pixel is foreground when any channel is >= ``threshold`` (0-255 scale), so greyscale, RGB and
    JPEG masks with grey edge values all work. A mask whose values are only 0 and 1 is taken as is.
    """
    mask = _open(Path(path), "RGB").max(axis=2)
    if mask.max() <= 1:
        return mask.astype(np.uint8)
    return (mask >= threshold).astype(np.uint8)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an image to ``size`` x ``size``: area interpolation when shrinking, linear when growing."""
    if image.shape[:2] == (size, size):
        return image
    shrink = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``size`` x ``size``: the image by :func:`resize_image`, the mask by nearest neighbour."""
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but mask is {mask.shape[1]}x{mask.shape[0]}")
    if image.shape[:2] != (size, size):
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return resize_image(image, size), mask
