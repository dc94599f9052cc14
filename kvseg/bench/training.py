"""Training speed: kvseg's own training loop against a plain fp32 loop, where its time goes, and the study's epoch.

The harness is timed in :func:`kvseg.training.train.train_one_epoch` itself, set up as a run sets it up;
the same loop then splits its steps into phases (:class:`kvseg.training.train.PhaseTimer`) and runs under
``torch.profiler`` for the top operators. The study trained 472 images per epoch in 300 s
(:data:`STUDY_TRAIN_IMAGES`, :data:`STUDY_SECONDS_PER_EPOCH`); it gives neither its image size nor
its U-Net width, so the projection uses the run's.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from kvseg.config import Config
from kvseg.data.augment import build_train_transform
from kvseg.data.dataset import SegmentationDataset, build_dataloaders
from kvseg.data.device_augment import DeviceBatches
from kvseg.data.folder import Sample
from kvseg.data.masks import MaskEncoding
from kvseg.data.preprocessed import PreprocessedFrames
from kvseg.models.losses import build_loss
from kvseg.models.unet import build_model
from kvseg.runtime import cpu_threads_per_process, resolve_augment_on, resolve_mixed_precision
from kvseg.training.factory import build_accelerator, prepare_model
from kvseg.training.optim import build_optimizer
from kvseg.training.train import PHASES, PhaseTimer, train_one_epoch

logger = logging.getLogger(__name__)

STUDY_SECONDS_PER_EPOCH = 300.0
STUDY_TRAIN_IMAGES = 472
TOP_OPERATORS = 12


@dataclass(frozen=True)
class Budget:
    """How long each measurement runs: sized to what one call or step costs on this machine.

    The default fits a benchmark of a base-32, 256x256 run into about three minutes on two CPU
    cores; :data:`FULL` (``benchmark.py --full``) is the long form.
    """

    latency_seconds: float = 2.0  # per backend and batch size
    min_iters: int = 5
    max_iters: int = 50
    train_seconds: float = 15.0  # per training loop
    min_steps: int = 4
    warmup_steps: int = 3
    warm_up_a_whole_epoch: bool = False  # fills the decoded-image cache first, as epoch 1 of a run does
    phase_steps: int = 4
    profile_steps: int = 3
    loader_seconds: float = 2.0  # per image size, source and worker count (kvseg.bench.loader)

    def iters(self, seconds_per_call: float) -> int:
        return min(self.max_iters, max(self.min_iters, math.ceil(self.latency_seconds / max(seconds_per_call, 1e-6))))

    def steps(self, seconds_per_step: float) -> int:
        return max(self.min_steps, math.ceil(self.train_seconds / max(seconds_per_step, 1e-6)))


DEFAULT = Budget()
FULL = Budget(latency_seconds=8.0, min_iters=20, max_iters=200, train_seconds=60.0, min_steps=20, warmup_steps=5,
              warm_up_a_whole_epoch=True, phase_steps=10, profile_steps=5, loader_seconds=6.0)


def plain_images_per_s(cfg: Config, samples: list[Sample], encoding: MaskEncoding, budget: Budget, device: str) -> float:
    """Images/s of the loop a study would write: fp32, NCHW, no workers, no cache, same model and loss."""
    dataset = SegmentationDataset(samples, cfg.data.image_size, build_train_transform(cfg.augment), encoding, cache=False)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    optimizer, loss_fn = build_optimizer(model, cfg.train), build_loss(cfg.train)

    def step(images: torch.Tensor, masks: torch.Tensor) -> None:
        loss = loss_fn(model(images.to(device)), masks.to(device).float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    batches = _cycle(loader)
    for _ in range(budget.warmup_steps):
        step(*next(batches)[:2])
    start = time.perf_counter()
    step(*next(batches)[:2])
    steps = budget.steps(time.perf_counter() - start)
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        batch_images, masks, _ = next(batches)
        step(batch_images, masks)
        images += len(batch_images)
    return images / (time.perf_counter() - start)


def _cycle(loader: DataLoader):
    while True:
        yield from loader


class Harness:
    """The training loop as ``train_ddp.py`` sets it up (precision, channels_last, workers, cache, where it
    augments: ``data.augment_on``), in one process."""

    def __init__(self, cfg: Config, samples: list[Sample], encoding: MaskEncoding,
                 frames: PreprocessedFrames | None = None) -> None:
        gpu = torch.cuda.is_available()
        self.cfg, self.accelerator = cfg, build_accelerator(cfg, resolve_mixed_precision("auto"))
        if self.accelerator.device.type == "cpu":
            torch.set_num_threads(cpu_threads_per_process(cfg.train.cpu_threads))  # as a run sets it
        torch.manual_seed(0)
        model = prepare_model(cfg, self.accelerator)
        optimizer, self.loss_fn = build_optimizer(model, cfg.train), build_loss(cfg.train)
        self.augment_on = resolve_augment_on(cfg.data.augment_on, self.accelerator.device,
                                             bool(cfg.augment.workers_only()))
        on_device = self.augment_on == "device"
        dataset = SegmentationDataset(samples, cfg.data.image_size, None if on_device else build_train_transform(cfg.augment),
                                      encoding, cache=cfg.data.cache != "off", seed=0, frames=frames)
        self.augment = DeviceBatches(cfg.augment, self.accelerator.device, dataset.sample_seed,
                                     cfg.train.channels_last).augment if on_device else None
        loader = build_dataloaders(cfg, {"train": dataset}, pin_memory=gpu)["train"]
        self.model, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader,
                                                                           device_placement=[True, True, not on_device])
        self.epoch = 0
        self.losses: list[tuple[int, float]] = []  # (images, mean loss) of every train_one_epoch call

    def run(self, steps: int, timer: PhaseTimer | None = None) -> tuple[int, float]:
        """``steps`` optimizer steps through :func:`train_one_epoch` (over epoch ends): (images, seconds)."""
        images, seconds, done = 0, 0.0, 0
        while done < steps:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            stats = train_one_epoch(self.model, self.loader, self.optimizer, self.loss_fn, self.accelerator,
                                    self.cfg.train.channels_last, "benchmark", max_steps=steps - done, timer=timer,
                                    augment=self.augment)
            done += math.ceil(stats.images / self.cfg.train.batch_size)
            images, seconds = images + stats.images, seconds + stats.seconds
            self.losses.append((stats.images, stats.loss))
        return images, seconds

    def settings(self) -> dict:
        return {"mixed_precision": self.accelerator.mixed_precision, "num_workers": self.loader.num_workers,
                "device": str(self.accelerator.device), "torch_threads": torch.get_num_threads(),
                "data_source": self.loader.dataset.source, "augment_on": self.augment_on}


def step_images_per_s(cfg: Config, image_size: int, seconds: float) -> dict:
    """What the training step consumes at ``image_size``: images/s of forward, loss, backward and optimizer step.

    The run's model, batch size, precision (``--mixed-precision auto``) and memory layout, on a
    batch already on the device (random images and masks): no loader, so this is the pace a loader
    has to keep. One untimed step, then at least one and about ``seconds`` timed. Returns
    ``{"images_per_s", "steps", "device", "mixed_precision"}``.
    """
    cfg = replace(cfg, data=replace(cfg.data, image_size=image_size))
    accelerator = build_accelerator(cfg, resolve_mixed_precision("auto"))
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_process(cfg.train.cpu_threads))
    torch.manual_seed(0)
    model = prepare_model(cfg, accelerator)
    optimizer, loss_fn = build_optimizer(model, cfg.train), build_loss(cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    images = torch.randn(cfg.train.batch_size, 3, image_size, image_size, device=accelerator.device)
    images = images.contiguous(memory_format=memory_format)
    masks = (torch.rand(cfg.train.batch_size, 1, image_size, image_size, device=accelerator.device) > 0.8).float()
    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)

    def step() -> None:
        loss = loss_fn(model(images).float(), masks)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    sync()
    steps, start = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - start < seconds:
        step()
        steps += 1
        sync()
    return {"images_per_s": steps * cfg.train.batch_size / (time.perf_counter() - start), "steps": steps,
            "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision}


def phase_split(harness: Harness, steps: int) -> dict:
    """Milliseconds per step and share of each phase of the harness's step (:data:`kvseg.training.train.PHASES`)."""
    timer = PhaseTimer(harness.accelerator.device)
    harness.run(steps, timer)
    total = sum(timer.seconds.values())
    return {"steps": timer.steps, "phases": {phase: {"ms_per_step": 1e3 * timer.seconds[phase] / max(timer.steps, 1),
                                                     "share": timer.seconds[phase] / total if total else 0.0}
                                            for phase in PHASES}}


def top_operators(harness: Harness, steps: int, limit: int = TOP_OPERATORS) -> list[dict]:
    """The operators with the most self time over ``steps`` harness steps (``torch.profiler``), per step."""
    gpu = harness.accelerator.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as profiler:
        harness.run(steps)
    events = [e for e in profiler.key_averages() if not e.key.startswith("ProfilerStep")]
    self_time: Callable = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    total = sum(self_time(e) for e in events) or 1
    ranked = sorted(events, key=self_time, reverse=True)[:limit]
    return [{"name": e.key, "ms_per_step": self_time(e) / 1e3 / steps, "share": self_time(e) / total,
             "calls_per_step": e.count / steps} for e in ranked]


def _projection(images_per_s: float) -> dict:
    epoch = STUDY_TRAIN_IMAGES / images_per_s
    return {"images_per_s": images_per_s, "projected_epoch_s": epoch, "speedup_vs_study": STUDY_SECONDS_PER_EPOCH / epoch}


def measure_training(cfg: Config, train_set: SegmentationDataset, budget: Budget = DEFAULT) -> dict:
    """The harness's training loop against a plain fp32 NCHW loop of the same model, in one process.

    Harness: :func:`~kvseg.training.train.train_one_epoch` with the precision kvseg picks
    (``--mixed-precision auto``; bf16 on a GPU that has it, as the GPU launcher files set),
    channels_last, DataLoader workers and the cache, as ``train_ddp.py`` runs by default; then its
    phase split and top operators. Plain: fp32, NCHW, no workers, no cache — the loop a study would
    write. The plain loop runs first, so it cannot profit from a cache the harness filled. Step
    counts follow ``budget``.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain = plain_images_per_s(cfg, train_set.samples, train_set.encoding, budget, device)
    logger.info(f"plain fp32 NCHW loop: {plain:.2f} images/s")
    harness = Harness(cfg, train_set.samples, train_set.encoding, train_set.frames)
    harness.run(len(harness.loader) if budget.warm_up_a_whole_epoch else budget.warmup_steps)
    images, seconds = harness.run(1)
    steps = budget.steps(seconds)
    images, seconds = harness.run(steps)
    logger.info(f"harness (train_one_epoch): {images / seconds:.2f} images/s over {steps} steps")
    phases = phase_split(harness, budget.phase_steps)
    operators = top_operators(harness, budget.profile_steps)
    return {
        "image_size": cfg.data.image_size, "base_channels": cfg.model.base_channels, "depth": cfg.model.depth,
        "batch_size": cfg.train.batch_size, "steps": steps, **harness.settings(),
        "plain_fp32_nchw": _projection(plain), "harness": _projection(images / seconds),
        "harness_vs_plain": images / seconds / plain, "phase_split": phases, "top_operators": operators,
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
