"""The images a trained run is scored on: its splits through the deterministic eval pipeline."""

from __future__ import annotations

from pathlib import Path

from kvseg.config import Config
from kvseg.data.dataset import SegmentationDataset, build_datasets
from kvseg.data.folder import find_samples
from kvseg.data.splits import resolve_split
from kvseg.runs.folder import RunDir


def eval_datasets(cfg: Config, run: RunDir | None, data_dir: str | Path | None = None) -> dict[str, SegmentationDataset]:
    """A run's train, validation and test images through the eval pipeline (no random augmentation), by split.

    The split is the one saved in ``run``; without a run, it is resolved from the data folder as
    training would. ``data_dir`` replaces the config's data root when the data moved.

    Raises:
        DatasetError: the data folder is missing or does not match the split (see :func:`kvseg.data.folder.find_samples`).
    """
    root = Path(data_dir or cfg.data.root)
    samples = find_samples(root)
    split = run.split(cfg, root) if run is not None else resolve_split(
        root, samples, cfg.data.split_seed, cfg.data.test_fraction, cfg.data.val_fraction, cfg.data.val_min_images)
    return build_datasets(cfg, samples, dict(split.items()), augment=())
