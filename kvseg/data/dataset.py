"""The PyTorch side of a dataset: :class:`SegmentationDataset`, its caches, and the loaders.

A dataset reads image/mask pairs found by :mod:`kvseg.data.folder`, resizes them, runs an albumentations
pipeline from :mod:`kvseg.data.augment` and returns tensors — or, without a pipeline, the uint8 pair
that :mod:`kvseg.data.device_augment` augments and normalises on the device; :func:`build_dataloaders`
makes the train / evaluation loaders of a run with the worker policy of :mod:`kvseg.runtime`.

Decoded, resized pairs come from one of three places (``data.cache``): ``disk``, the persistent
memory-mapped cache of :mod:`kvseg.data.preprocessed` (decoded once per folder and size, then read by
every later run); ``memory``, shared memory filled by the workers during a run's first epoch; or
``off``, decoding every read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kvseg.config import Config, DataConfig
from kvseg.data.augment import build_eval_transform, build_train_transform
from kvseg.data.encodings import dataset_encoding
from kvseg.data.folder import Sample
from kvseg.data.masks import MaskEncoding
from kvseg.data.preprocessed import CacheUnavailable, PreprocessedFrames, decode_pair, open_or_build, resolve_cache_dir
from kvseg.errors import EmptyDatasetError
from kvseg.runtime import default_num_workers, end_workers_at_exit, init_worker, single_threaded_opencv

logger = logging.getLogger(__name__)


class SegmentationDataset(Dataset):
    """Image/mask pairs, resized, augmented and returned as ``(image, mask, index)``.

    ``image`` is what ``transform`` returns (a normalised float tensor (3, S, S) for kvseg's
    pipelines; without ``transform`` the uint8 RGB array (S, S, 3) as decoded, for augmentation on the
    device), ``mask`` a uint8 tensor (1, S, S) in {0, 1} and ``index`` the position in ``samples``.

    Masks are read through ``encoding``, the dataset's one mask encoding (:mod:`kvseg.data.masks`); pass
    the encoding decided for the whole folder. None decides it from these samples' masks alone.

    With ``frames`` (an entry of the on-disk cache holding every sample's id, at ``image_size``) the
    decoded arrays are read from there. Otherwise, with ``cache=True`` they live in shared memory,
    allocated once in the process that builds the dataset: DataLoader workers fill it on first read
    and every worker, in every later epoch, reads from the same memory instead of decoding again.
    Where shared memory cannot be had (a small ``/dev/shm``), the dataset says so once and decodes
    every read instead.

    Random augmentations are seeded per sample from ``(seed, epoch, index)``, so they are
    reproducible for a seed, differ across epochs, workers and processes, and do not depend on the
    number of workers (see :meth:`set_epoch`).

    Raises:
        EmptyDatasetError: ``samples`` is empty.
        ValueError: ``frames`` was made at another size or lacks one of the samples.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        transform: Callable | None = None,
        encoding: MaskEncoding | None = None,
        cache: bool = False,
        seed: int = 0,
        frames: PreprocessedFrames | None = None,
    ) -> None:
        if not samples:
            raise EmptyDatasetError("dataset split is empty; expected at least one image")
        if frames is not None and (frames.image_size != image_size or not all(s.id in frames for s in samples)):
            raise ValueError(f"{frames.folder}: cache entry does not hold every sample at {image_size} px")
        self.frames = frames
        self.samples = list(samples)
        self.image_size = image_size
        self.transform = transform
        self.encoding = encoding or dataset_encoding(DataConfig(), [sample.mask for sample in self.samples])
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if cache and frames is None:
            n, s = len(self.samples), image_size
            try:
                self._cache = (
                    torch.empty((n, s, s, 3), dtype=torch.uint8).share_memory_(),
                    torch.empty((n, s, s), dtype=torch.uint8).share_memory_(),
                    torch.zeros(n, dtype=torch.bool).share_memory_(),
                )
            except RuntimeError as exc:  # /dev/shm too small (Docker's default is 64 MB): decode every read
                note = (f"note: no shared-memory cache ({str(exc).splitlines()[0][:120]}); decoding every read "
                        "(a larger /dev/shm, e.g. docker run --shm-size=2g, or data.cache=disk avoids it)")
                if note not in _NOTES_GIVEN:
                    _NOTES_GIVEN.add(note)
                    logger.info(note)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def source(self) -> str:
        """Where decoded pairs come from: ``disk cache``, ``shared memory`` (filled on first read) or ``decoding``."""
        return "disk cache" if self.frames is not None else "shared memory" if self._cache is not None else "decoding"

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``; call before iterating a DataLoader over it."""
        self._epoch.fill_(epoch)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Decoded, resized uint8 image (S, S, 3) and {0, 1} mask (S, S), from a cache when it holds them."""
        if self.frames is not None:
            return self.frames.pair(self.samples[index].id)
        if self._cache is not None and bool(self._cache[2][index]):
            return self._cache[0][index].numpy(), self._cache[1][index].numpy()
        image, mask = decode_pair(self.samples[index], self.image_size, self.encoding)
        if self._cache is not None:
            self._cache[0][index] = torch.from_numpy(image)
            self._cache[1][index] = torch.from_numpy(mask)
            self._cache[2][index] = True
        return image, mask

    def sample_seed(self, index: int) -> int:
        """Seed of the random augmentation of sample ``index`` in the current epoch."""
        sequence = np.random.SeedSequence([self.seed, int(self._epoch), index])
        return int(sequence.generate_state(1)[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, mask = self.load(index)
        if self.transform is None:  # fresh arrays or views of the cache: collating copies them into the batch
            return torch.from_numpy(image), torch.from_numpy(mask)[None], index
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(self.sample_seed(index))
        out = self.transform(image=image, mask=mask)
        return out["image"], torch.as_tensor(out["mask"], dtype=torch.uint8)[None], index


def dataset_frames(data: DataConfig, samples: dict[str, Sample], encoding: MaskEncoding,
                   build: bool = True) -> PreprocessedFrames | None:
    """The on-disk cache entry of every sample when ``data.cache`` is ``disk``, else None.

    Where the entry cannot be written (or, with ``build`` false, is not there: another process of
    the machine was to write it), says so in one line and returns None (the run decodes into shared
    memory instead).

    Raises:
        ConfigError: ``data.cache_dir`` is inside the data folder.
    """
    if data.cache != "disk" or not samples:
        return None
    cache_dir = resolve_cache_dir(data.cache_dir, Path(next(iter(samples.values())).image).resolve().parents[1])
    try:
        return open_or_build(list(samples.values()), data.image_size, encoding, cache_dir, build=build)
    except CacheUnavailable as reason:
        note = f"note: no on-disk cache ({reason}); decoding into shared memory during the first epoch instead"
        if note not in _NOTES_GIVEN:  # once per process: the run's evaluation at the end reads the folder again
            _NOTES_GIVEN.add(note)
            logger.info(note)
        return None


_NOTES_GIVEN: set[str] = set()


def build_datasets(cfg: Config, samples: dict[str, Sample], split: dict[str, list[str]], augment: Sequence[str] = ("train",),
                   uint8: bool = False, build_cache: bool = True) -> dict[str, SegmentationDataset]:
    """One dataset per named split: those in ``augment`` with the random training pipeline, the others with the eval one.

    With ``uint8`` every split returns its decoded uint8 pairs instead, to be augmented (those in
    ``augment``) and normalised on the device by :class:`kvseg.data.device_augment.DeviceBatches`.
    Masks are read with ``data.mask_encoding``; under ``auto`` it is decided here from every mask in
    ``samples``. Pairs are read through ``data.cache`` (see the module docstring); with
    ``build_cache`` false an on-disk entry is only opened, never written (another process of this
    machine wrote it).
    """
    encoding = dataset_encoding(cfg.data, [sample.mask for sample in samples.values()])
    frames = dataset_frames(cfg.data, samples, encoding, build=build_cache)
    common = dict(image_size=cfg.data.image_size, encoding=encoding, cache=cfg.data.cache != "off", frames=frames)

    def transform(name: str) -> Callable | None:
        if uint8:
            return None
        return build_train_transform(cfg.augment) if name in augment else build_eval_transform(cfg.augment)

    return {name: SegmentationDataset([samples[i] for i in ids], transform=transform(name), seed=cfg.train.seed, **common)
            for name, ids in split.items()}


def build_dataloaders(cfg: Config, datasets: dict[str, SegmentationDataset], pin_memory: bool = False
                      ) -> dict[str, DataLoader]:
    """A loader per dataset with ``data.num_workers`` workers (-1: :func:`kvseg.runtime.default_num_workers`).

    ``train`` shuffles, and only its workers stay alive across epochs: the validation and test
    loaders run a few batches now and then, and their workers would idle through training.
    """
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers()
    if workers:
        single_threaded_opencv()
        end_workers_at_exit()
    return {
        name: DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=name == "train", num_workers=workers,
                         pin_memory=pin_memory, persistent_workers=workers > 0 and name == "train",
                         worker_init_fn=init_worker if workers else None)
        for name, dataset in datasets.items()
    }
