"""Data loading alone: images/s of decode + augment + collate, per DataLoader worker, with and without the disk cache.

No model runs: this says whether the input pipeline can feed a faster consumer (a GPU) and what
each worker adds. For each image size (the run's and 512 by default) the training split's pairs are
read two ways, each by 0, 1, 2, 4, ... workers up to this process's cores:

* ``decode``: every read decodes the files and resizes, as a loader without any cache does (and as
  a run's first epoch does without the disk cache);
* ``disk cache``: every read comes from a :mod:`kvseg.data.preprocessed` entry, as later runs read.

Both run the run's random training augmentations and collate batches of the run's batch size.
The entry is built in a temporary folder and removed after, so the benchmark leaves no large
files behind; its build time is reported (it is what a first run pays once). OpenCV runs
single-threaded, as in a run's workers, so images/s per worker is the cost of one core.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence

from torch.utils.data import DataLoader

from kvseg.config import Config
from kvseg.data.augment import build_train_transform
from kvseg.data.dataset import SegmentationDataset
from kvseg.data.folder import Sample
from kvseg.data.masks import MaskEncoding
from kvseg.data.preprocessed import CacheUnavailable, open_or_build
from kvseg.runtime import single_threaded_opencv, usable_cores

logger = logging.getLogger(__name__)

LOADER_SIZES = (512,)  # measured besides the run's own size


def worker_counts(cores: int) -> list[int]:
    """0, 1, 2, 4, ... up to ``cores`` (``cores`` itself included)."""
    counts, n = [0, 1], 2
    while n < cores:
        counts.append(n)
        n *= 2
    return counts + ([cores] if cores > 1 else [])


def images_per_s(loader: DataLoader, seconds: float) -> tuple[float, int]:
    """Images/s delivered by ``loader`` over about ``seconds`` (epochs repeated, one batch at least), after its first.

    The first batch is not timed: it includes starting the workers. Returns (images/s, images timed).
    """
    batches = iter(loader)
    next(batches)
    images, start = 0, time.perf_counter()
    while images == 0 or time.perf_counter() - start < seconds:  # at least one batch
        try:
            images += len(next(batches)[0])
        except StopIteration:
            batches = iter(loader)
    return images / (time.perf_counter() - start), images


def measure_loader(cfg: Config, samples: Sequence[Sample], encoding: MaskEncoding, seconds: float,
                   sizes: Sequence[int] | None = None) -> dict:
    """Loader throughput per image size, source and worker count; see the module docstring.

    Returns ``{"batch_size", "images", "sizes": [{"image_size", "cache_build_s", "cache_mib", "rows":
    [{"source", "workers", "images_per_s", "per_worker", "images_timed"}]}]}``; per_worker is
    images/s divided by the worker count (by 1 for the main process alone). A size whose temporary
    entry cannot be written (``$TMPDIR`` too small) is ``{"image_size", "skipped": reason}``.
    """
    single_threaded_opencv()
    sizes = list(sizes) if sizes is not None else sorted({cfg.data.image_size, *LOADER_SIZES})
    report = {"batch_size": cfg.train.batch_size, "images": len(samples), "sizes": []}
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="kvseg-loader-") as folder:
            start = time.perf_counter()
            try:
                frames = open_or_build(samples, size, encoding, folder, quiet=True)
            except CacheUnavailable as reason:  # a small $TMPDIR: say so, keep what was measured
                report["sizes"].append({"image_size": size, "skipped": f"{reason} (set TMPDIR to a larger disk)"})
                logger.info(f"loader {size} px skipped: {reason}")
                continue
            entry = {"image_size": size, "cache_build_s": time.perf_counter() - start,
                     "cache_mib": frames.nbytes / 2**20, "rows": []}
            for source, source_frames in (("decode", None), ("disk cache", frames)):
                for workers in worker_counts(usable_cores()):
                    dataset = SegmentationDataset(samples, size, build_train_transform(cfg.augment), encoding,
                                                  frames=source_frames)
                    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers,
                                        persistent_workers=workers > 0)
                    rate, timed = images_per_s(loader, seconds)
                    del loader
                    entry["rows"].append({"source": source, "workers": workers, "images_per_s": rate,
                                          "per_worker": rate / max(workers, 1), "images_timed": timed})
                    logger.info(f"loader {size} px, {source}, {workers} worker(s): {rate:.1f} images/s")
            report["sizes"].append(entry)
    return report


def loader_markdown(loader: dict) -> list[str]:
    """The loader table: one row per size, source and worker count."""
    lines = ["", "## Data loading alone (decode + augment + collate, no model)", "",
             f"Training split, {loader['images']} images, batch {loader['batch_size']}; 0 workers: the main "
             "process loads. The disk cache is built once per folder and size; a run's later epochs and later runs "
             "read it.", "",
             "| size | source | workers | images/s | per worker | cache build s (MiB) |",
             "| ---: | --- | ---: | ---: | ---: | --- |"]
    for entry in loader["sizes"]:
        if "skipped" in entry:
            lines.append(f"| {entry['image_size']} | skipped: {entry['skipped']} | | | | |")
        for row in entry.get("rows", []):
            build = f"{entry['cache_build_s']:.1f} ({entry['cache_mib']:.0f})" if row["source"] == "disk cache" else ""
            lines.append(f"| {entry['image_size']} | {row['source']} | {row['workers']} | {row['images_per_s']:.1f} | "
                         f"{row['per_worker']:.1f} | {build} |")
    return lines
