"""Preprocessing as a step: the folder check and the disk cache, done once per machine and then reused.

    python -m kvseg.preprocess DATA_DIR [--config FILE] [--set key=value ...] [--image-size N]

runs both ahead of training, as nnU-Net's ``nnUNetv2_plan_and_preprocess`` does; training does the
same at its start, and whatever was done before is not done again:

* **The check's record.** What the folder check decodes of each pair (sizes, modes, digests, mask
  value histograms: :class:`kvseg.data.check.PairRecord`) is kept in ``CACHE_DIR/<folder>-check-<key>.json.gz``,
  keyed like the frame cache by every file's path, size, times and inode. A later check of the
  same files — a resumed run, another config, another image size — reads it and decodes nothing;
  the summary is derived again from it with the settings of the moment (mask encoding, split).
* **The frame cache** (:mod:`kvseg.data.preprocessed`) at ``data.image_size``, when ``data.cache`` is ``disk``.
* **The outcome**, ``CACHE_DIR/<folder>-ready-<key>.json``: the mask encoding decided and the error,
  if any, keyed by the files and the settings that decide them. With several processes on a
  machine only the first (``LOCAL_RANK`` 0) checks and builds; the others wait for this file — a
  file, not a collective with a timeout, so a large folder can take as long as it takes — and read
  the decision from it. A process that fails first ends the launch (torchrun stops the others).

``CACHE_DIR`` is the frame cache's (``data.cache_dir``, ``$KVSEG_CACHE_DIR``, ``~/.cache/kvseg``), never
inside the data folder; the records are written whatever ``data.cache`` says (a few KiB a pair).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvseg.config import Config, DataConfig
from kvseg.data.check import FolderReport, PairRecord, check_folder, read_pairs
from kvseg.data.folder import FolderScan, Sample, scan_folder
from kvseg.data.masks import MaskEncoding, MaskValues
from kvseg.data.preprocessed import (
    INDEX,
    CacheUnavailable,
    PreprocessedFrames,
    entry_folder,
    file_fingerprint,
    fingerprints,
    open_or_build,
    resolve_cache_dir,
)
from kvseg.data.splits import SPLIT_FILES
from kvseg.errors import ConfigError, DatasetError
from kvseg.files import WriteError, write_bytes, write_json
from kvseg.runtime import local_processes

logger = logging.getLogger(__name__)

RECORD_FORMAT = 1
POLL_SECONDS = 0.2


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _pair_to_json(record: PairRecord) -> dict:
    mask = record.mask
    return {**asdict(record), "mask": None if mask is None else {
        "path": str(mask.path), "source": mask.source, "format": mask.format, "lossy": mask.lossy,
        "size": list(mask.size), "values": mask.values.tolist(), "counts": mask.counts.tolist()}}


def _pair_from_json(values: dict) -> PairRecord:
    mask = values["mask"]
    return PairRecord(values["id"], tuple(values["image_size"]) if values["image_size"] else None, values["image_mode"],
                      values["rotated"], values["digest"],
                      None if mask is None else MaskValues(Path(mask["path"]), mask["source"], mask["format"], mask["lossy"],
                                                           tuple(mask["size"]), np.array(mask["values"], np.int64),
                                                           np.array(mask["counts"], np.int64)),
                      list(values["problems"]))


@dataclass
class PairStore:
    """The check's record of one folder's pairs in ``cache_dir`` (see the module docstring); ``reused`` after :meth:`read`."""

    cache_dir: Path
    reused: bool = False
    path: Path | None = None

    def read(self, scan: FolderScan) -> list[PairRecord]:
        """The :class:`PairRecord` of every pair of ``scan``, in order: from the record when the files are unchanged,
        else decoded (:func:`kvseg.data.check.read_pairs`) and recorded."""
        samples = list(scan.samples.values())
        key = _digest({"format": RECORD_FORMAT, "files": fingerprints(samples)})
        self.path = self.cache_dir / f"{scan.root.resolve().name or 'data'}-check-{key[:16]}.json.gz"
        if self.path.is_file():
            try:
                stored = json.loads(gzip.decompress(self.path.read_bytes()))
                if stored.get("key") == key:
                    self.reused = True
                    return [_pair_from_json(values) for values in stored["pairs"]]
            except (OSError, ValueError, KeyError, TypeError, EOFError):
                pass  # damaged: decoded and written again
        records = read_pairs(samples)
        payload = {"format": RECORD_FORMAT, "key": key, "root": str(scan.root.resolve()),
                   "pairs": [_pair_to_json(record) for record in records]}
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            write_bytes(self.path, gzip.compress(json.dumps(payload).encode(), compresslevel=6))
        except (OSError, WriteError) as exc:
            logger.info(f"note: the check's record could not be kept in {self.cache_dir} ({exc}); the next check decodes again")
            self.path = None
        return records


def outcome_path(cache_dir: Path, scan: FolderScan, data: DataConfig) -> Path:
    """Where the outcome of preparing ``scan`` under ``data`` is kept: keyed by the files, the split files and the settings."""
    splits = [file_fingerprint(scan.root / name) for name in SPLIT_FILES if (scan.root / name).is_file()]
    settings = {key: getattr(data, key) for key in ("mask_encoding", "mask_threshold", "foreground_values", "split_seed",
                                                    "test_fraction", "val_fraction", "image_size", "cache")}
    described = {"format": RECORD_FORMAT, "files": fingerprints(list(scan.samples.values())), "splits": splits,
                 "passed_over": sorted(str(item.path) for item in scan.passed_over), "settings": settings,
                 "unpaired": [scan.images_without_mask, scan.masks_without_image]}
    return cache_dir / f"{scan.root.resolve().name or 'data'}-ready-{_digest(described)[:16]}.json"


@dataclass
class Prepared:
    """What :func:`prepare_folder` did: the check's report, whether its record was reused, the frames built or opened."""

    report: FolderReport
    records_reused: bool
    record: Path | None  # the check's record, when it could be written
    frames: PreprocessedFrames | None
    cache_line: str | None  # what was done for the frame cache; None when data.cache is not disk or the check failed
    outcome: Path

    @property
    def encoding(self) -> str | None:
        return self.report.decision.encoding.name if self.report.decision else None


def prepare_folder(root: str | Path, data: DataConfig) -> Prepared:
    """Check the folder at ``root`` (from the check's record where the files are unchanged), build its frame cache
    at ``data.image_size`` when ``data.cache`` is ``disk`` and the check passed, and record the outcome.

    Raises:
        DatasetError: the folder, ``images/`` or ``masks/`` is missing, or holds no image.
        ConfigError: the cache folder is inside the data folder; or, with several processes on this
            machine, the outcome cannot be written there (the others wait for it).
    """
    cache_dir = resolve_cache_dir(data.cache_dir, root)
    store = PairStore(cache_dir)
    report = check_folder(root, data, read=store.read)
    frames, cache_line = None, None
    if report.ok and data.cache == "disk" and report.decision is not None:
        frames, cache_line = _cache(list(report.scan.samples.values()), data.image_size, report.decision.encoding, cache_dir)
    outcome = outcome_path(cache_dir, report.scan, data)
    try:
        write_json(outcome, {"encoding": report.decision.encoding.name if report.decision else None,
                             "error": report.error_line(), "frames": str(frames.folder) if frames else None})
    except (OSError, WriteError) as exc:
        if local_processes() > 1:
            raise ConfigError(f"{cache_dir}: cannot write there ({exc}); the processes of a machine meet in the cache "
                              "folder: set data.cache_dir or $KVSEG_CACHE_DIR to a writable folder") from None
    return Prepared(report, store.reused, store.path, frames, cache_line, outcome)


def _cache(samples: list[Sample], image_size: int, encoding: MaskEncoding, cache_dir: Path
           ) -> tuple[PreprocessedFrames | None, str]:
    """The frame cache entry, opened or built, and one line saying which (or why there is none)."""
    existed = (entry_folder(samples, image_size, encoding, cache_dir) / INDEX).is_file()
    start = time.perf_counter()
    try:
        frames = open_or_build(samples, image_size, encoding, cache_dir, quiet=True)
    except CacheUnavailable as reason:
        return None, f"note: no on-disk cache ({reason}); the run decodes into shared memory during its first epoch"
    size = f"{frames.folder} ({frames.nbytes / 2**20:.0f} MiB)"
    if existed:
        return frames, f"Cache: {size} holds the {len(samples)} pairs at {image_size} px already"
    return frames, (f"Cache: decoded {len(samples)} pairs at {image_size} px in {time.perf_counter() - start:.1f} s into "
                    f"{size}; later runs on this folder read them instead of decoding")


def wait_for_outcome(root: str | Path, data: DataConfig) -> tuple[str | None, str | None]:
    """In the other processes of a machine: wait until its first process has prepared ``root``; (encoding, error line).

    Raises:
        DatasetError: as :func:`kvseg.data.folder.scan_folder` (the first process stops on it too).
    """
    outcome = outcome_path(resolve_cache_dir(data.cache_dir, root), scan_folder(root), data)
    while True:  # no timeout: a large folder takes as long as it takes; a failed first process ends the launch
        try:
            stored = json.loads(outcome.read_text())
            return stored["encoding"], stored["error"]
        except (OSError, ValueError, KeyError):
            time.sleep(POLL_SECONDS)


def prepare_training_data(cfg: Config, local_main: bool) -> None:
    """Before epoch 1: check ``cfg.data.root`` and build its cache once per machine, print the brief summary, fix the encoding.

    ``local_main`` is true in one process per machine (``accelerator.is_local_main_process``): it
    prepares (:func:`prepare_folder`) and logs; the others wait for its outcome
    (:func:`wait_for_outcome`). The encoding decided (or the one ``data.mask_encoding`` names) is
    written into ``cfg.data.mask_encoding`` on every process, so the config saved in the run
    folder and in every checkpoint reads masks the same way on resume, in the report and in export.

    Raises:
        DatasetError: the check found errors (the first three are named).
    """
    if local_main:
        prepared = prepare_folder(cfg.data.root, cfg.data)
        for line in prepared.report.lines(brief=True):
            logger.info(line)
        if prepared.records_reused:
            logger.info(f"  (from the check's record {prepared.record}: no file changed since it was made)")
        if prepared.cache_line:
            logger.info(prepared.cache_line)
        encoding, error = prepared.encoding, prepared.report.error_line()
    else:
        encoding, error = wait_for_outcome(cfg.data.root, cfg.data)
    if error:
        raise DatasetError(error)
    if encoding:
        cfg.data.mask_encoding = encoding
