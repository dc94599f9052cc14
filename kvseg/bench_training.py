"""Training speed: kvseg's own training loop against a plain fp32 loop, projected to the study's epoch.

The study trained 472 images per epoch in 300 s (:data:`STUDY_TRAIN_IMAGES`,
:data:`STUDY_SECONDS_PER_EPOCH`); it gives neither its image size nor its U-Net width, so the
projection uses the run's.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kvseg.augment import build_train_transform
from kvseg.config import Config
from kvseg.data import Sample
from kvseg.dataset import SegmentationDataset, build_dataloaders
from kvseg.factory import build_accelerator, prepare_model
from kvseg.losses import build_loss
from kvseg.masks import MaskEncoding
from kvseg.model import build_model
from kvseg.optim import build_optimizer
from kvseg.runtime import resolve_mixed_precision
from kvseg.train import train_one_epoch

STUDY_SECONDS_PER_EPOCH = 300.0
STUDY_TRAIN_IMAGES = 472


def plain_images_per_s(cfg: Config, samples: list[Sample], encoding: MaskEncoding, steps: int, warmup: int,
                       device: str) -> float:
    """Images/s of the loop a study would write: fp32, NCHW, no workers, no cache, same model and loss."""
    dataset = SegmentationDataset(samples, cfg.data.image_size, build_train_transform(cfg.augment),
                                  encoding, cache=False)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    optimizer, loss_fn = build_optimizer(model, cfg.train), build_loss(cfg.train)
    done, images, start = 0, 0, time.perf_counter()
    while done < warmup + steps:
        for batch_images, masks, _ in loader:
            if done == warmup:
                images, start = 0, time.perf_counter()
            loss = loss_fn(model(batch_images.to(device)), masks.to(device).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            done, images = done + 1, images + len(batch_images)
            if done == warmup + steps:
                break
    return images / (time.perf_counter() - start)


def harness_images_per_s(cfg: Config, samples: list[Sample], encoding: MaskEncoding, steps: int) -> tuple[float, dict]:
    """Images/s of :func:`kvseg.train.train_one_epoch` as a run sets it up, after one warm-up epoch.

    The warm-up epoch starts the DataLoader workers and fills the decoded-image cache, as epoch 1
    of a real run does. Returns the rate and the settings it ran with.
    """
    gpu = torch.cuda.is_available()
    precision = resolve_mixed_precision("auto")
    if gpu and precision == "no" and torch.cuda.is_bf16_supported():
        precision = "bf16"  # what configs/accelerate/gpu_*.yaml launch with
    accelerator = build_accelerator(cfg, precision)
    torch.manual_seed(0)
    model = prepare_model(cfg, accelerator)
    optimizer, loss_fn = build_optimizer(model, cfg.train), build_loss(cfg.train)
    dataset = SegmentationDataset(samples, cfg.data.image_size, build_train_transform(cfg.augment),
                                  encoding, cache=cfg.data.cache, seed=0)
    loader = build_dataloaders(cfg, {"train": dataset}, pin_memory=gpu)["train"]
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    train_one_epoch(model, loader, optimizer, loss_fn, accelerator, cfg.train.channels_last, "warm-up")
    images, seconds, epoch = 0, 0.0, 1
    while images < steps * cfg.train.batch_size:
        epoch += 1
        loader.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, loss_fn, accelerator, cfg.train.channels_last,
                                "timed", max_steps=steps - images // cfg.train.batch_size)
        images, seconds = images + stats.images, seconds + stats.seconds
    settings = {"mixed_precision": accelerator.mixed_precision, "num_workers": loader.num_workers,
                "device": str(accelerator.device)}
    return images / seconds, settings


def _projection(images_per_s: float) -> dict:
    epoch = STUDY_TRAIN_IMAGES / images_per_s
    return {"images_per_s": images_per_s, "projected_epoch_s": epoch, "speedup_vs_study": STUDY_SECONDS_PER_EPOCH / epoch}


def measure_training(cfg: Config, train_set: SegmentationDataset, steps: int, warmup: int) -> dict:
    """The harness's training loop against a plain fp32 NCHW loop of the same model, in one process.

    Harness: :func:`~kvseg.train.train_one_epoch` with the precision kvseg picks
    (``--mixed-precision auto``; bf16 on a GPU that has it, as the GPU launcher files set),
    channels_last, DataLoader workers and the shared cache, as ``train_ddp.py`` runs by default.
    Plain: fp32, NCHW, no workers, no cache — the loop a study would write. The plain loop runs
    first, so it cannot profit from a cache the harness filled.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain = plain_images_per_s(cfg, train_set.samples, train_set.encoding, steps, warmup, device)
    harness, settings = harness_images_per_s(cfg, train_set.samples, train_set.encoding, steps)
    return {
        "image_size": cfg.data.image_size, "base_channels": cfg.model.base_channels, "depth": cfg.model.depth,
        "batch_size": cfg.train.batch_size, "steps": steps, **settings,
        "plain_fp32_nchw": _projection(plain), "harness": _projection(harness), "harness_vs_plain": harness / plain,
    }


def history_summary(history_path: Path) -> dict | None:
    """Measured epoch times of a run (its history.json), projected to the study's 472-image epoch."""
    if not history_path.is_file():
        return None
    history = json.loads(history_path.read_text())
    if not history:
        return None
    later = history[1:] or history  # epoch 1 includes decoding into the cache and worker start-up
    rate = statistics.median(h["images_per_s"] for h in later)
    return {"epochs": len(history), "median_epoch_s": statistics.median(h["seconds"] for h in later),
            "median_images_per_s": rate, **{k: v for k, v in _projection(rate).items() if k != "images_per_s"}}
