"""The folder check: read every image/mask pair of a dataset and say what is there, before training on it.

    python -m kvseg.check DATA_DIR [--config FILE] [--set data.mask_encoding=labels ...]

Like nnU-Net's dataset-integrity check (``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``),
it decodes every file and prints a summary a person can act on: the pairs found; the files passed
over and why; image sizes and modes; the mask encoding decided and the value sets seen; the
instrument fraction (min / median / max) and the ids of empty masks; every image/mask size
mismatch; duplicate images (same decoded pixels under two ids); the split files and their status.
Exit status 0 when the folder can be trained on, 2 when it cannot. Training prints the same
summary, shorter, before epoch 1 (:func:`kvseg.data.prepare.prepare_training_data`), from a record of
the pairs kept beside the disk cache when the files have not changed since.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvseg.config import DataConfig
from kvseg.data.encodings import EncodingDecision, decide_encoding
from kvseg.data.folder import FolderScan, Sample, image_to_rgb, open_upright, preview, scan_folder
from kvseg.data.masks import MaskValues, inspect_mask, misfit_message
from kvseg.data.splits import SPLIT_FILES, Split, resolve_split
from kvseg.errors import CorruptImageError, KvsegError, user_message

logger = logging.getLogger(__name__)

LISTED = 8  # ids named in one line before "and N more"


@dataclass
class PairRecord:
    """What the check read of one pair: the image's upright size, mode, orientation and pixel digest; the mask's values."""

    id: str
    image_size: tuple[int, int] | None = None  # (width, height), upright
    image_mode: str = ""  # e.g. "RGB JPEG"
    rotated: bool = False  # an EXIF orientation other than 1 was applied
    digest: str | None = None  # BLAKE2b of the decoded, upright RGB pixels
    mask: MaskValues | None = None
    problems: list[str] = field(default_factory=list)


def _read_pair(sample: Sample) -> PairRecord:
    record = PairRecord(sample.id)
    try:
        image, orientation = open_upright(sample.image)
        record.image_size, record.rotated = image.size, orientation != 1
        record.image_mode = f"{image.mode} {image.format or '?'}"
        pixels = image_to_rgb(image)
        record.digest = hashlib.blake2b(pixels.tobytes() + repr(pixels.shape).encode(), digest_size=16).hexdigest()
    except CorruptImageError as exc:
        record.problems.append(str(exc))
    try:
        record.mask = inspect_mask(sample.mask)
    except CorruptImageError as exc:
        record.problems.append(str(exc))
    return record


def read_pairs(samples: Sequence[Sample], workers: int | None = None) -> list[PairRecord]:
    """:class:`PairRecord` of every sample, in order, decoded on a few threads."""
    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1 or len(samples) < 8:
        return [_read_pair(sample) for sample in samples]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_read_pair, samples, chunksize=8))


def _histogram(counter: Counter, limit: int = 4) -> str:
    common = counter.most_common(limit)
    text = ", ".join(f"{key}: {count}" for key, count in common)
    rest = sum(counter.values()) - sum(count for _, count in common)
    return text + (f", {len(counter) - limit} other(s): {rest}" if rest else "")


@dataclass
class FolderReport:
    """The result of :func:`check_folder`: what was found, the decided mask encoding, errors and warnings.

    ``errors`` stop training (exit status 2); ``warnings`` are worth a look but do not.
    """

    root: Path
    scan: FolderScan
    records: list[PairRecord]
    decision: EncodingDecision | None
    fractions: dict[str, float]  # id -> instrument fraction of its mask under the decided encoding
    split: Split | None
    split_line: str
    duplicates: list[list[str]]
    mismatches: list[str]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def _fraction_line(self) -> str:
        if not self.fractions:
            return "no mask read"
        values = np.array(list(self.fractions.values()))
        empty = [i for i, f in self.fractions.items() if f == 0]
        return (f"min {values.min():.4f}, median {float(np.median(values)):.4f}, max {values.max():.4f} of a mask's pixels; "
                + (f"{len(empty)} empty mask(s): {preview(empty, LISTED)}" if empty else "no empty mask"))

    def lines(self, brief: bool = False) -> list[str]:
        """The summary, one fact per line; ``brief`` keeps what training prints before epoch 1."""
        records = [r for r in self.records if r.image_size is not None]
        sizes = Counter(f"{w}x{h}" for w, h in (r.image_size for r in records))
        modes = Counter(r.image_mode for r in records)
        rotated = sum(r.rotated for r in records)
        passed = self.scan.passed_over_line() or "nothing passed over"
        out = [f"Data {self.root}: {len(self.scan.samples)} image/mask pairs; {passed}"]
        out.append(f"  image sizes (width x height, upright): {_histogram(sizes)}; modes: {_histogram(modes)}"
                   + (f"; {rotated} turned upright by their EXIF orientation" if rotated else ""))
        if self.decision is not None:
            out.append(f"  masks: {self.decision.line()}")
            out.append(f"  mask values seen: {self.decision.value_sets()}")
        out.append(f"  instrument: {self._fraction_line()}")
        if not brief:
            out.append(f"  sizes: {len(self.mismatches)} image/mask size mismatch(es)" if self.mismatches
                       else "  sizes: every mask has its image's size")
            out.append(f"  duplicates: {self._duplicates_text()}")
            out.append(f"  split: {self.split_line}")
        # Training stops on errors with one line of its own; the brief summary keeps three warnings.
        for title, items in ((("error", self.errors),) if not brief else ()) + (("warning", self.warnings),):
            shown = items if not brief else items[:3]
            out += [f"  {title}: {item}" for item in shown]
            if len(shown) < len(items):
                out.append(f"  ... {len(items) - len(shown)} more {title}(s) (python -m kvseg.check {self.root})")
        if not brief:
            out.append(f"Result: {'OK' if self.ok else 'NOT OK'}, {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return out

    def _duplicates_text(self) -> str:
        if not self.duplicates:
            return "none (decoded pixels compared)"
        groups = [" = ".join(group) + self._straddles(group) for group in self.duplicates]
        return f"{len(groups)} group(s) with the same decoded pixels: {preview(groups, 4)}"

    def _straddles(self, group: list[str]) -> str:
        """`` (in train and test)`` when the ids of ``group`` fall into more than one split."""
        if self.split is None:
            return ""
        names = [name for name, ids in self.split.items() if set(group) & set(ids)]
        return f" (in {' and '.join(names)})" if len(names) > 1 else ""

    def error_line(self) -> str | None:
        """The errors in one line (the first three named), or None."""
        if not self.errors:
            return None
        more = f"; and {len(self.errors) - 3} more" if len(self.errors) > 3 else ""
        return (f"{self.root}: the folder check found {len(self.errors)} problem(s): " + "; ".join(self.errors[:3])
                + more + f" (python -m kvseg.check {self.root} lists them all)")


def check_folder(root: str | Path, data: DataConfig | None = None, workers: int | None = None,
                 read: Callable[[FolderScan], list[PairRecord]] | None = None) -> FolderReport:
    """Read every pair under ``root`` and report on it (see the module docstring).

    ``data`` gives the mask encoding settings and the seeded split (defaults: :class:`DataConfig`).
    ``read`` gives the :class:`PairRecord` of every pair of the scan, in order, instead of decoding
    them (:mod:`kvseg.data.prepare` keeps them from an earlier check of the same files).

    Raises:
        DatasetError: the folder, ``images/`` or ``masks/`` is missing, or holds no image.
    """
    data = data or DataConfig()
    scan = scan_folder(root)
    errors, warnings = [], []
    if scan.images_without_mask:
        errors.append(f"{scan.root / 'masks'}: no mask for {len(scan.images_without_mask)} image(s): "
                      f"{preview(scan.images_without_mask, LISTED)} (expected a mask with the same file stem)")
    if scan.masks_without_image:
        errors.append(f"{scan.root / 'images'}: no image for {len(scan.masks_without_image)} mask(s): "
                      f"{preview(scan.masks_without_image, LISTED)} (expected an image with the same file stem)")
    samples = list(scan.samples.values())
    records = read(scan) if read is not None else read_pairs(samples, workers)
    for record in records:
        errors += record.problems

    masks = {r.id: r.mask for r in records if r.mask is not None}
    decision, fractions = None, {}
    if masks:
        decision = decide_encoding(list(masks.values()), data.mask_encoding, data.mask_threshold, data.foreground_values)
        auto = data.mask_encoding == "auto"
        errors += [misfit_message(m, None if auto and m.kind == "unknown" else decision.encoding) for m in decision.misfits]
        misfits = {m.path for m in decision.misfits}
        fractions = {i: decision.encoding.fraction(m) for i, m in masks.items() if m.path not in misfits}
        median = float(np.median(list(fractions.values()))) if fractions else 0.0
        if fractions and max(fractions.values()) == 0:
            errors.append(f"{scan.root / 'masks'}: every mask reads as empty ({decision.encoding.describe()}); "
                          "expected instrument pixels in some (see data.mask_encoding, data.foreground_values)")
        elif median > 0.5:
            warnings.append(f"most pixels read as instrument (median fraction {median:.2f}): are the masks inverted? "
                            "(data.foreground_values names the instrument values)")
        empty = [i for i, f in fractions.items() if f == 0]
        if empty:
            warnings.append(f"{len(empty)} empty mask(s) (no instrument pixel): {preview(empty, LISTED)}")

    mismatches = []
    for record, sample in zip(records, samples):
        if record.image_size and record.mask and record.image_size != record.mask.size:
            (iw, ih), (mw, mh) = record.image_size, record.mask.size
            mismatches.append(f"{sample.mask}: mask is {mw}x{mh} but its image is {iw}x{ih}; expected the same size")
    errors += mismatches

    by_digest: dict[str, list[str]] = {}
    for record in records:
        if record.digest:
            by_digest.setdefault(record.digest, []).append(record.id)
    duplicates = [ids for ids in by_digest.values() if len(ids) > 1]

    split, split_line = None, ""
    present = [name for name in SPLIT_FILES if (scan.root / name).is_file()]
    try:
        split = resolve_split(scan.root, scan.samples, data.split_seed, data.test_fraction, data.val_fraction,
                              data.val_min_images)
        counts = f"{len(split.train)} train / {len(split.val)} validation / {len(split.test)} test"
        split_line = (f"{', '.join(present)}: {counts}, from {split.source}; every id found, none in two splits"
                      if present else
                      f"no split files: {counts}, from {split.source} (data.split_seed, data.test_fraction "
                      f"{data.test_fraction}, data.val_fraction {data.val_fraction}); written to the run folder, never here")
    except KvsegError as exc:
        errors.append(user_message(exc))
        split_line = f"{', '.join(present) or 'no split files'}: not usable (see the errors)"

    report = FolderReport(Path(root), scan, records, decision, fractions, split, split_line, duplicates, mismatches,
                          errors, warnings)
    if duplicates:
        warnings.append(f"duplicate images: {report._duplicates_text()}")
    return report
