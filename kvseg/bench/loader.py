"""Will the step starve? Loader images/s of both data paths, per worker and at the configured count, beside the step.

No model runs in the loader rows: they say whether the input pipeline can feed a faster consumer
(a GPU). For each image size (the run's and 512 by default) the training split's pairs are loaded
by the two paths of ``data.augment_on``:

* ``workers``: the run's albumentations pipeline in the DataLoader workers, normalised float32 shipped;
* ``device``: uint8 shipped, augmented and normalised per batch on the device
  (:mod:`kvseg.data.device_augment`) — its loader rows are the workers' side only; the device side
  is measured on its own, on the run's device, as ``device augmentation``;

each from two sources — ``decode`` (every read decodes and resizes, as without any cache) and
``disk cache`` (a :mod:`kvseg.data.preprocessed` entry, as later runs read) — with one worker (the
cost of one core: OpenCV runs single-threaded, as in a run's workers) and with the configured count
(``data.num_workers``; -1: :func:`kvseg.runtime.default_num_workers`). Each row reports the bytes
per image of its batches (images, masks and indices). Beside them, the training step's own images/s at that
size (:func:`kvseg.bench.training.step_images_per_s`: the batch already on the device) and the
verdict: what the loader delivers from the disk cache at the configured count, as a multiple of
what the step consumes. The entry is built in a temporary folder and removed after, so the
benchmark leaves no large files behind; its build time is reported (what a first run pays once).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from kvseg.bench.training import step_images_per_s
from kvseg.config import Config
from kvseg.data.augment import build_train_transform
from kvseg.data.dataset import SegmentationDataset
from kvseg.data.device_augment import DeviceBatches
from kvseg.data.folder import Sample
from kvseg.data.masks import MaskEncoding
from kvseg.data.preprocessed import CacheUnavailable, open_or_build
from kvseg.runtime import default_num_workers, single_threaded_opencv

logger = logging.getLogger(__name__)

LOADER_SIZES = (512,)  # measured besides the run's own size
PATHS = {"workers": "albumentations in the workers, float32 shipped", "device": "uint8 shipped, augmented on the device"}


def worker_counts(cfg: Config) -> list[int]:
    """One worker (the per-worker cost) and the configured count, when that is another."""
    configured = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers()
    return sorted({1, max(configured, 1)})


def _nbytes(batch: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in batch if isinstance(t, torch.Tensor))


def images_per_s(loader: DataLoader, seconds: float) -> tuple[float, int, float]:
    """Images/s delivered by ``loader`` over about ``seconds`` (epochs repeated, one batch at least), after its first.

    The first batch is not timed: it includes starting the workers. Returns (images/s, images
    timed, bytes per image of the first batch).
    """
    batches = iter(loader)
    first = next(batches)
    per_image = _nbytes(first) / len(first[0])
    images, start = 0, time.perf_counter()
    while images == 0 or time.perf_counter() - start < seconds:  # at least one batch
        try:
            images += len(next(batches)[0])
        except StopIteration:
            batches = iter(loader)
    return images / (time.perf_counter() - start), images, per_image


def device_augment_per_s(cfg: Config, image_size: int, device: torch.device, seconds: float) -> float:
    """Images/s of :meth:`DeviceBatches.augment` on ``device``: uint8 batches of the run's batch size, host to augmented."""
    batches = DeviceBatches(cfg.augment, device, seeds=lambda index: index, channels_last=cfg.train.channels_last)
    n = cfg.train.batch_size
    images = torch.randint(0, 256, (n, image_size, image_size, 3), dtype=torch.uint8)
    masks = torch.randint(0, 2, (n, 1, image_size, image_size), dtype=torch.uint8)
    if device.type == "cuda":
        images, masks = images.pin_memory(), masks.pin_memory()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches.augment(images, masks, range(n))
    sync()
    done, start = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - start < seconds:
        batches.augment(images, masks, range(done, done + n))
        done += n
        sync()
    return done / (time.perf_counter() - start)


def _rows(cfg: Config, samples: Sequence[Sample], encoding: MaskEncoding, size: int, frames, seconds: float) -> list[dict]:
    rows = []
    for path in PATHS:
        for source, source_frames in (("decode", None), ("disk cache", frames)):
            for workers in worker_counts(cfg):
                transform = build_train_transform(cfg.augment) if path == "workers" else None
                dataset = SegmentationDataset(samples, size, transform, encoding, frames=source_frames)
                loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers,
                                    persistent_workers=True)
                rate, timed, per_image = images_per_s(loader, seconds)
                del loader
                rows.append({"path": path, "source": source, "workers": workers, "images_per_s": rate,
                             "per_worker": rate / workers, "images_timed": timed, "bytes_per_image": per_image})
                logger.info(f"loader {size} px, {path} path, {source}, {workers} worker(s): {rate:.1f} images/s")
    return rows


def measure_loader(cfg: Config, samples: Sequence[Sample], encoding: MaskEncoding, seconds: float,
                   sizes: Sequence[int] | None = None) -> dict:
    """Loader throughput per image size, path, source and worker count, beside the step; see the module docstring.

    Returns ``{"batch_size", "images", "workers": [...], "sizes": [{"image_size", "cache_build_s",
    "cache_mib", "rows": [{"path", "source", "workers", "images_per_s", "per_worker", "images_timed",
    "bytes_per_image"}], "device_augment": {"device", "images_per_s"}, "step": {...}}]}`` (``step``
    as :func:`kvseg.bench.training.step_images_per_s` returns it). A size whose temporary entry
    cannot be written (``$TMPDIR`` too small) is ``{"image_size", "skipped": reason}``.
    """
    single_threaded_opencv()
    sizes = list(sizes) if sizes is not None else sorted({cfg.data.image_size, *LOADER_SIZES})
    report = {"batch_size": cfg.train.batch_size, "images": len(samples), "workers": worker_counts(cfg), "sizes": []}
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="kvseg-loader-") as folder:
            start = time.perf_counter()
            try:
                frames = open_or_build(samples, size, encoding, folder, quiet=True)
            except CacheUnavailable as reason:  # a small $TMPDIR: say so, keep what was measured
                report["sizes"].append({"image_size": size, "skipped": f"{reason} (set TMPDIR to a larger disk)"})
                logger.info(f"loader {size} px skipped: {reason}")
                continue
            entry = {"image_size": size, "cache_build_s": time.perf_counter() - start, "cache_mib": frames.nbytes / 2**20,
                     "rows": _rows(cfg, samples, encoding, size, frames, seconds)}
        step = step_images_per_s(cfg, size, seconds)
        device = torch.device(step["device"])
        entry["device_augment"] = {"device": str(device), "images_per_s": device_augment_per_s(cfg, size, device, seconds)}
        entry["step"] = step
        logger.info(f"training step {size} px: {step['images_per_s']:.1f} images/s on {device}; device augmentation "
                    f"{entry['device_augment']['images_per_s']:.1f} images/s")
        report["sizes"].append(entry)
    return report


def verdicts(loader: dict) -> list[str]:
    """Per size and path: ``the loader delivers N x what the step consumes`` (disk cache, the configured workers)."""
    lines = []
    for entry in loader["sizes"]:
        if "skipped" in entry:
            continue
        step, workers = entry["step"]["images_per_s"], max(row["workers"] for row in entry["rows"])
        for path, what in PATHS.items():
            row = next(r for r in entry["rows"] if (r["path"], r["source"], r["workers"]) == (path, "disk cache", workers))
            extra = ""
            if path == "device":
                ms = 1e3 * loader["batch_size"] / entry["device_augment"]["images_per_s"]
                extra = f"; augmenting a batch on {entry['device_augment']['device']} adds {ms:.1f} ms to its step"
            lines.append(f"{entry['image_size']} px, {path} path ({what}): the loader delivers "
                         f"{row['images_per_s'] / step:.1f} x what the step consumes ({row['images_per_s']:.1f} images/s "
                         f"from {workers} worker(s) against {step:.1f} images/s of the step; "
                         f"{row['bytes_per_image'] / 1024:.0f} KiB an image through the pipe{extra})")
    return lines


def loader_markdown(loader: dict) -> list[str]:
    """The loader table (one row per size, path, source and worker count), the step beside it, and the verdicts."""
    lines = ["", "## Will the step starve? Data loading beside the training step", "",
             f"Training split, {loader['images']} images, batch {loader['batch_size']}; worker counts "
             f"{', '.join(map(str, loader['workers']))} (the last is the configured one). No model runs in these rows; "
             "the device path's rows are its workers' side (reading and collating uint8).", "",
             "| size | path | source | workers | images/s | per worker | KiB per image | cache build s (MiB) |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for entry in loader["sizes"]:
        if "skipped" in entry:
            lines.append(f"| {entry['image_size']} | skipped: {entry['skipped']} | | | | | | |")
        for row in entry.get("rows", []):
            build = f"{entry['cache_build_s']:.1f} ({entry['cache_mib']:.0f})" if row["source"] == "disk cache" else ""
            lines.append(f"| {entry['image_size']} | {row['path']} | {row['source']} | {row['workers']} | "
                         f"{row['images_per_s']:.1f} | {row['per_worker']:.1f} | {row['bytes_per_image'] / 1024:.0f} | {build} |")
    measured = [entry for entry in loader["sizes"] if "step" in entry]
    if measured:
        lines += ["", "| size | training step images/s | on | device augmentation images/s |", "| ---: | ---: | --- | ---: |"]
        lines += [f"| {e['image_size']} | {e['step']['images_per_s']:.1f} | {e['step']['device']}, "
                  f"{e['step']['mixed_precision']} | {e['device_augment']['images_per_s']:.1f} |" for e in measured]
        lines += [""] + [f"- {line}" for line in verdicts(loader)]
    return lines
