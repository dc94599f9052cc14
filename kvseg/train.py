"""Training with accelerate: the epoch loop and the run around it.

``Accelerator`` does device placement, DDP, mixed precision and gradient accumulation; every piece
of rank logic goes through it. One epoch is :func:`train_one_epoch`; scoring is
:func:`kvseg.evaluate.evaluate`; :func:`run_training` reads top to bottom: set up, build, loop, finish.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from kvseg.check import check_training_data
from kvseg.config import Config, config_to_yaml
from kvseg.data import Split, find_samples, resolve_split
from kvseg.dataset import build_dataloaders, build_datasets
from kvseg.errors import CheckpointError, KvsegError
from kvseg.evaluate import EvalResult, evaluate, torch_logits
from kvseg.losses import build_loss
from kvseg.model import build_model
from kvseg.optim import build_optimizer, build_scheduler
from kvseg.report import write_report
from kvseg.runs import CheckpointSaver, RunDir, create_run, open_run, resume_config
from kvseg.runs import Progress as RunProgress
from kvseg.runtime import cpu_threads_per_process, describe_machine, no_accelerator, resolve_mixed_precision
from kvseg.synthetic import resolve_data_root


class NonFiniteLossError(KvsegError):
    """The training loss became NaN or infinite."""


@dataclass
class RunOptions:
    """What the command line decides beyond the config."""

    data_dir_given: bool = False  # an explicit data dir must exist: no fall-back to synthetic data
    resume: str | None = None
    mixed_precision: str = "auto"  # "auto", "no", "fp16" or "bf16"


@dataclass
class EpochStats:
    """One epoch of training: mean loss over all samples on all processes, wall seconds, images, learning rate."""

    loss: float
    seconds: float
    images: int
    lr: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self, epoch: int, epochs: int) -> str:
        return (f"Epoch [{epoch}/{epochs}], Average Loss: {self.loss:.4f}, "
                f"time {self.seconds:.1f}s, {self.images_per_s:.1f} images/s")


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    accelerator: Accelerator,
    channels_last: bool,
    description: str = "training",
    max_steps: int | None = None,
) -> EpochStats:
    """One pass over ``loader`` (or its first ``max_steps`` batches); the loss is averaged over all samples on all processes."""
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    # The bar redraws from a thread that competes for the GIL: keep it slow, and off when
    # the output is not a terminal (logs, CI), where it shows nothing anyway.
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}"), transient=True, refresh_per_second=2,
        disable=not (accelerator.is_main_process and sys.stdout.isatty()),
    )
    with progress:
        task = progress.add_task(description, total=steps, loss="-")
        for step, (images, masks, _) in enumerate(loader):
            if step == steps:
                break
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                logits = model(images)
                loss = loss_fn(logits.float(), masks.float())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double() * len(images)
            count += len(images)
            if step % 10 == 0 and accelerator.is_main_process:
                progress.update(task, loss=f"{loss.item():.4f}")
            progress.advance(task)
    loss_sum, count = accelerator.reduce(torch.stack([loss_sum, count]), reduction="sum")
    return EpochStats(float(loss_sum / count), time.perf_counter() - start, int(count), optimizer.param_groups[0]["lr"])


# ---------------------------------------------------------------------------------------------
# Set-up of a run


def build_accelerator(cfg: Config, options: RunOptions) -> Accelerator:
    """The accelerator of a run: kvseg's precision and device policy (:mod:`kvseg.runtime`), seeded sampling."""
    return Accelerator(
        cpu=no_accelerator(),
        mixed_precision=resolve_mixed_precision(options.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
    )


def start_run(cfg: Config, options: RunOptions, accelerator: Accelerator) -> tuple[RunDir, Split, RunProgress, Path | None]:
    """A new run folder, or the one to resume: its split, progress and the state folder to load (None when new).

    A new run resolves the data folder first (writing the synthetic stand-in when needed) and
    records it in ``cfg.data.root``.
    """
    if options.resume:
        run = open_run(options.resume)
        resume_config(run, cfg)
        state, progress = run.load_progress()
        return run, run.split(cfg), progress, state
    cfg.data.root = str(resolve_data_root(cfg.data, options.data_dir_given, accelerator))
    split = resolve_split(cfg.data.root, find_samples(cfg.data.root), cfg.data.split_seed, cfg.data.test_fraction)
    return create_run(cfg.output_dir, cfg.run_name, accelerator), split, RunProgress(), None


def environment(accelerator: Accelerator) -> dict:
    """The machine (:func:`kvseg.runtime.describe_machine`) and how this run uses it."""
    return {**describe_machine(), "device": str(accelerator.device), "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "mixed_precision": accelerator.mixed_precision}


def prepare_model(cfg: Config, accelerator: Accelerator) -> torch.nn.Module:
    """The U-Net of ``cfg``, with SyncBatchNorm under multi-GPU DDP (``train.sync_batchnorm``) and channels_last."""
    model: torch.nn.Module = build_model(cfg.model)
    sync = cfg.train.sync_batchnorm
    if sync == "on" or (sync == "auto" and accelerator.num_processes > 1 and accelerator.device.type == "cuda"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def load_state(accelerator: Accelerator, state: Path, progress: RunProgress) -> None:
    """Restore model, optimizer, scheduler, sampler and RNG states saved by :meth:`RunDir.save_state`."""
    try:
        accelerator.load_state(str(state))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{state}: cannot load training state ({str(exc).splitlines()[0]})") from None
    accelerator.print(f"Resumed from {state} after epoch {progress.epoch}")


def check_finite(stats: EpochStats, epoch: int, run: RunDir, progress: RunProgress) -> None:
    """Stop on a NaN or infinite epoch loss, naming the last checkpoint that exists."""
    if math.isfinite(stats.loss):
        return
    kept = (f"last good checkpoint: {run.last}, epoch {progress.epoch}" if progress.epoch
            else "no epoch completed, nothing was saved")
    raise NonFiniteLossError(f"epoch {epoch}: training loss is {stats.loss}; stopped ({kept}); "
                             "try a lower train.lr or --mixed-precision no")


def history_record(epoch: int, stats: EpochStats, result: EvalResult | None) -> dict:
    """One row of history.json."""
    return {"epoch": epoch, "train_loss": stats.loss, "test_loss": result.loss if result else None,
            "test_iou": result.per_image.iou if result else None, "seconds": stats.seconds,
            "images_per_s": stats.images_per_s, "lr": stats.lr}


# ---------------------------------------------------------------------------------------------
# The run


def run_training(cfg: Config, options: RunOptions) -> Path:
    """Train ``cfg`` end to end and return the run folder; see the README for what it holds."""
    accelerator = build_accelerator(cfg, options)
    run, split, progress, state = start_run(cfg, options, accelerator)
    check_training_data(cfg, accelerator)  # prints the folder summary; fixes data.mask_encoding
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_process(cfg.train.cpu_threads))
    accelerator.print(config_to_yaml(cfg).rstrip())
    run_lock = run.lock(accelerator)  # noqa: F841 - held until training returns
    accelerator.print(
        f"Run folder {run}; data {cfg.data.root} ({len(split.train)} train / {len(split.test)} test, split from "
        f"{split.source}); {accelerator.num_processes} process(es) on {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}"
    )
    if accelerator.is_main_process and state is None:
        run.write_start(cfg, split, environment(accelerator))

    set_seed(cfg.train.seed)
    model = prepare_model(cfg, accelerator)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    accelerator.register_for_checkpointing(scheduler)
    datasets = build_datasets(cfg, find_samples(cfg.data.root), {"train": split.train, "test": split.test})
    loaders = build_dataloaders(cfg, datasets, accelerator.num_processes, pin_memory=accelerator.device.type == "cuda")
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, loaders["train"], loaders["test"])
    loss_fn = build_loss(cfg.train)
    if state is not None:
        load_state(accelerator, state, progress)
    saver = CheckpointSaver(run, progress, score=lambda result: result.per_image.iou)
    score = partial(evaluate, loader=test_loader, threshold=cfg.train.threshold, loss_fn=loss_fn,
                    loss_name=cfg.train.loss, gather=accelerator.gather_for_metrics)

    epochs, result = cfg.train.epochs, None
    for epoch in range(progress.epoch + 1, epochs + 1):
        train_loader.set_epoch(epoch)
        datasets["train"].set_epoch(epoch)
        stats = train_one_epoch(model, train_loader, optimizer, loss_fn, accelerator, cfg.train.channels_last,
                                f"epoch {epoch}/{epochs}")
        check_finite(stats, epoch, run, progress)
        scheduler.step()
        accelerator.print(stats.line(epoch, epochs))
        due = epoch == epochs or (cfg.train.eval_every > 0 and epoch % cfg.train.eval_every == 0)
        result = score(torch_logits(model, cfg.train.channels_last)) if due else None
        if result is not None:
            accelerator.print(f"Test {result.line()}")
        progress.epoch = epoch
        progress.history.append(history_record(epoch, stats, result))
        if accelerator.is_main_process:
            saver.save(accelerator.unwrap_model(model), cfg, epoch, result)
            run.write_history(progress.history)
        run.save_state(accelerator, progress)

    finish_run(run, cfg, torch_logits(model, cfg.train.channels_last), score, result, progress, accelerator)
    accelerator.end_training()
    return run.path


def finish_run(run: RunDir, cfg: Config, logits_fn, score, result: EvalResult | None, progress: RunProgress,
               accelerator: Accelerator) -> None:
    """The final test evaluation (plain and with TTA), metrics.json and the report."""
    if result is None:  # resumed a run that had already finished: evaluate the final weights again
        result = score(logits_fn)
        accelerator.print(f"Test {result.line()}")
    metrics = {"epoch": progress.epoch, **result.to_json()}
    if cfg.eval.tta:
        tta = score(logits_fn, tta=cfg.eval.tta)
        accelerator.print(f"With TTA ({len(cfg.eval.tta)} transforms): Test {tta.line()}")
        metrics["tta"] = {k: v for k, v in tta.to_json().items() if k not in ("images", "curves")}
    if accelerator.is_main_process:
        run.write_metrics(metrics)
        write_report(run)
    accelerator.print(f"Wrote {run}")
