"""Training with accelerate: the epoch loop and the run around it.

``Accelerator`` does device placement, DDP, mixed precision and gradient accumulation; every piece
of rank logic goes through it. One epoch is :func:`train_one_epoch`; scoring is
:func:`kvseg.evaluation.evaluate.evaluate`; :func:`run_training` reads top to bottom: set up, build, loop, finish.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from kvseg.config import Config
from kvseg.errors import KvsegError
from kvseg.evaluation.evaluate import EvalResult, evaluate, tune_threshold
from kvseg.runs.checkpoint import load_model_checkpoint, set_threshold
from kvseg.runs.folder import Progress as RunProgress
from kvseg.runs.folder import RunDir
from kvseg.training.distributed import check_process_group
from kvseg.training.epoch_loss import EpochLoss
from kvseg.training.factory import RunOptions, Training, build_accelerator, build_training, load_state, start_run
from kvseg.training.saver import CheckpointSaver

logger = logging.getLogger(__name__)


class NonFiniteLossError(KvsegError):
    """The training loss became NaN or infinite."""


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


PHASES = ("data wait", "forward", "backward", "optimizer")


@dataclass
class PhaseTimer:
    """Wall seconds of each phase of a training step (:data:`PHASES`), summed over the steps it saw.

    Each mark synchronises a GPU first, so that queued work is charged to the phase that queued it:
    a profile, not the pace of an untimed run.
    """

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: int = 0
    _last: float = 0.0

    def start(self) -> None:
        self._sync()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """Charge the time since the previous mark to ``phase``; ``optimizer`` ends a step."""
        self._sync()
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now
        self.steps += phase == PHASES[-1]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    accelerator: Accelerator,
    channels_last: bool,
    description: str = "training",
    max_steps: int | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: AveragedModel | None = None,
    timer: PhaseTimer | None = None,
    augment: Callable | None = None,
) -> EpochStats:
    """One pass over ``loader`` (or its first ``max_steps`` batches).

    ``scheduler`` and ``ema`` step after every optimizer step (not every micro-batch under gradient
    accumulation). The returned loss is averaged over all samples on all processes, each once
    (:class:`~kvseg.training.epoch_loss.EpochLoss`); ``lr`` is the learning rate of the epoch's last
    step. ``timer`` splits each step into :data:`PHASES`. ``augment`` turns a loader batch of uint8
    pairs into the augmented, normalised one on the device (``data.augment_on: device``).
    """
    model.train()
    start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
    epoch_loss = EpochLoss(accelerator, loss_fn)
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
        if timer is not None:
            timer.start()
        for step, (images, masks, indices) in enumerate(loader):
            if step == steps:
                break
            if augment is not None:  # uint8 from the workers: rotated, flipped and normalised on the device
                images, masks = augment(images, masks, indices)
            if timer is not None:
                timer.mark("data wait")
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                logits = model(images)
                loss = loss_fn(logits.float(), masks.float())
                if timer is not None:
                    timer.mark("forward")
                accelerator.backward(loss)
                if timer is not None:
                    timer.mark("backward")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                lr = optimizer.param_groups[0]["lr"]
                if scheduler is not None:
                    scheduler.step()
                if ema is not None:
                    ema.update_parameters(accelerator.unwrap_model(model, keep_torch_compile=False))
            epoch_loss.add(loss, logits, masks)
            if step % 10 == 0 and accelerator.is_main_process:
                progress.update(task, loss=f"{loss.item():.4f}")
            progress.advance(task)
            if timer is not None:
                timer.mark("optimizer")
    loss, images = epoch_loss.total()
    return EpochStats(loss, time.perf_counter() - start, images, lr)


# ---------------------------------------------------------------------------------------------
# Set-up of a run





def check_finite(stats: EpochStats, epoch: int, run: RunDir, progress: RunProgress) -> None:
    """Stop on a NaN or infinite epoch loss, naming the last checkpoint that exists."""
    if math.isfinite(stats.loss):
        return
    kept = (f"last good checkpoint: {run.last}, epoch {progress.epoch}" if progress.epoch
            else "no epoch completed, nothing was saved")
    raise NonFiniteLossError(f"epoch {epoch}: training loss is {stats.loss}; stopped ({kept}); "
                             "try a lower train.lr or --mixed-precision no")


def history_record(epoch: int, stats: EpochStats, result: EvalResult | None, best: bool) -> dict:
    """One row of history.json (validation scores where the epoch was evaluated)."""
    return {"epoch": epoch, "train_loss": stats.loss, "val_loss": result.loss if result else None,
            "val_iou": result.per_image.iou if result else None, "val_dice": result.per_image.dice if result else None,
            "best": best, "seconds": stats.seconds, "images_per_s": stats.images_per_s, "lr": stats.lr}





# ---------------------------------------------------------------------------------------------
# The run


def run_training(cfg: Config, options: RunOptions) -> Path:
    """Train ``cfg`` end to end and return the run folder; see the README for what it holds."""
    accelerator = build_accelerator(cfg, options.mixed_precision)
    check_process_group(accelerator.num_processes)
    run, split, progress, state = start_run(cfg, options, accelerator)
    set_seed(cfg.train.seed)
    training = build_training(cfg, split, accelerator)
    if state is not None:
        load_state(accelerator, state, progress)
    saver = CheckpointSaver(run, progress, cfg.train.select_metric if "val" in training.loaders else None,
                            cfg.train.keep_every)
    score = partial(evaluate, threshold=cfg.train.threshold, loss_fn=training.loss_fn, loss_name=cfg.train.loss,
                    processes=accelerator, normalise=training.normalise)
    for epoch in range(progress.epoch + 1, cfg.train.epochs + 1 if not progress.stopped_early else 0):
        run_epoch(epoch, cfg, training, score, saver, accelerator)
        if progress.stopped_early:
            logger.info(f"Early stopping after epoch {epoch}: no validation improvement since epoch "
                              f"{progress.best_epoch} ({cfg.train.early_stopping_patience} evaluations)")
            break
    finish_run(cfg, training, score, saver, accelerator)
    accelerator.end_training()
    return run.path


def run_epoch(epoch: int, cfg: Config, training: Training, score, saver: CheckpointSaver, accelerator: Accelerator) -> None:
    """Train one epoch, validate when due, write the checkpoints, history and training state of ``epoch``."""
    run, progress, epochs = saver.run, saver.progress, cfg.train.epochs
    training.loaders["train"].set_epoch(epoch)
    training.datasets["train"].set_epoch(epoch)
    stats = train_one_epoch(training.model, training.loaders["train"], training.optimizer, training.loss_fn, accelerator,
                            cfg.train.channels_last, f"epoch {epoch}/{epochs}", scheduler=training.scheduler,
                            ema=training.ema, augment=training.augment)
    check_finite(stats, epoch, run, progress)
    logger.info(stats.line(epoch, epochs))
    due = "val" in training.loaders and (epoch == epochs or epoch % cfg.train.eval_every == 0)
    started = time.perf_counter()
    result = score(training.logits, training.loaders["val"]) if due else None
    validation_seconds = time.perf_counter() - started
    progress.epoch = epoch
    best = saver.save(training.weights, cfg, epoch, result, write=accelerator.is_main_process)
    if result is not None:
        logger.info(f"Validation {result.line()}{' (best so far)' if best else ''}")
    progress.history.append({**history_record(epoch, stats, result, best), "val_seconds": validation_seconds})
    accelerator.log({k: v for k, v in progress.history[-1].items() if isinstance(v, float)}, step=epoch)
    progress.stopped_early = not saver.patience_left(cfg.train.early_stopping_patience, cfg.train.eval_every)
    if accelerator.is_main_process:
        run.write_history(progress.history)
    run.save_state(accelerator, progress)


def finish_run(cfg: Config, training: Training, score, saver: CheckpointSaver, accelerator: Accelerator) -> None:
    """Load the selected weights, tune the threshold on validation (optional), then score the test split once.

    Writes metrics.json and per_image.csv (the figures and index.html are :mod:`kvseg.evaluation.report`'s,
    written by the command after training). The test split is evaluated here and nowhere
    else, with the weights and threshold that validation chose.
    """
    run, loaders, scored = saver.run, training.loaders, training.logits
    accelerator.wait_for_everyone()
    selected = [load_model_checkpoint(run.best)["model"] if accelerator.is_main_process else None]
    broadcast_object_list(selected)  # other machines may not see the main machine's files
    training.weights.load_state_dict(selected[0])
    threshold, tuning = cfg.train.threshold, None
    if cfg.eval.tune_threshold and "val" in loaders:
        choice = tune_threshold(scored, loaders["val"], cfg.eval.threshold_grid, processes=accelerator,
                                normalise=training.normalise)
        threshold, tuning = choice.value, asdict(choice)
        logger.info(f"Threshold {threshold} (tuned on validation: per-image Dice {max(choice.dice):.4f})")
        if accelerator.is_main_process:
            set_threshold(run.best, threshold, tuning)
    selection = saver.selection()
    logger.info(f"Selected epoch {selection['epoch']}"
                      + (f" (validation {selection['metric']} {selection['score']:.4f})" if selection["split"] else
                         " (no validation split: the last epoch)"))
    results = {name: score(scored, loaders[name], threshold=threshold) for name in ("val", "test") if name in loaders}
    logger.info(f"Test {results['test'].line()}")
    metrics = {"epoch": selection["epoch"], "epochs_trained": saver.progress.epoch,
               "stopped_early": saver.progress.stopped_early, "selection": selection,
               "threshold": {"value": threshold, "tuned_on": "validation" if tuning else None, **(tuning or {})},
               **{("validation" if name == "val" else name): _without_rows(result) for name, result in results.items()}}
    if cfg.eval.tta:
        tta = score(scored, loaders["test"], threshold=threshold, tta=cfg.eval.tta)
        logger.info(f"With TTA ({len(cfg.eval.tta)} transforms): Test {tta.line()}")
        metrics["test_tta"] = _without_rows(tta)
    if accelerator.is_main_process:
        run.write_metrics(metrics)
        run.write_per_image([{**asdict(row), "split": "validation" if name == "val" else name}
                             for name, result in results.items() for row in result.images])
    accelerator.log({f"test_{k}": v for k, v in asdict(results["test"].per_image).items()}, step=saver.progress.epoch)


def _without_rows(result: EvalResult) -> dict:
    """An evaluation for metrics.json: its per-image rows go to per_image.csv instead."""
    return {k: v for k, v in result.to_json().items() if k != "images"}
