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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from kvseg.config import Config
from kvseg.errors import KvsegError
from kvseg.evaluation.evaluate import EvalResult, evaluate
from kvseg.runs.folder import Progress as RunProgress
from kvseg.runs.folder import RunDir
from kvseg.training.distributed import check_process_group
from kvseg.training.epoch_loss import EpochLoss
from kvseg.training.factory import RunOptions, Training, build_accelerator, build_training, load_state, start_run
from kvseg.training.finish import finish_run
from kvseg.training.optim import ProgressSchedule
from kvseg.training.saver import CheckpointSaver
from kvseg.training.stopping import Control

logger = logging.getLogger(__name__)


class NonFiniteLossError(KvsegError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochStats:
    """One epoch of training: mean loss over all samples on all processes, wall seconds, images, learning rate.

    ``steps`` counts this process's optimizer steps; ``stopped`` is True when a :class:`Control` ended
    the epoch before its last batch.
    """

    loss: float
    seconds: float
    images: int
    lr: float
    steps: int = 0
    stopped: bool = False

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self, epoch: int, epochs: int | None, progress: float | None = None) -> str:
        """``Epoch [3/30], Average Loss: ...`` (the study's format); with ``progress``, ``Epoch [3], ... progress 41.2%``."""
        of = f"/{epochs}" if epochs is not None and progress is None else ""
        return (f"Epoch [{epoch}{of}], Average Loss: {self.loss:.4f}, time {self.seconds:.1f}s, "
                f"{self.images_per_s:.1f} images/s" + (f", progress {progress:.1%}" if progress is not None else ""))


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
    scheduler: ProgressSchedule | None = None,
    ema: AveragedModel | None = None,
    timer: PhaseTimer | None = None,
    control: Control | None = None,
    augment: Callable | None = None,
) -> EpochStats:
    """One pass over ``loader`` (or its first ``max_steps`` batches), or until ``control`` says stop.

    After every optimizer step (not every micro-batch under gradient accumulation) ``control`` counts
    the step and says how far the run is and whether every process stops here; ``scheduler`` then
    sets the learning rate for that progress and ``ema`` averages the weights. The returned loss is
    averaged over all samples on all processes, each once (:class:`~kvseg.training.epoch_loss.EpochLoss`);
    ``lr`` is the learning rate of the epoch's last step. ``timer`` splits each step into :data:`PHASES`.
    ``augment`` turns a loader batch of uint8 pairs into the augmented, normalised one on the device
    (``data.augment_on: device``).
    """
    model.train()
    start, lr, optimizer_steps, stopped = time.perf_counter(), optimizer.param_groups[0]["lr"], 0, False
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
                lr, optimizer_steps = optimizer.param_groups[0]["lr"], optimizer_steps + 1
                stopped = control is not None and control.after_step()
                if scheduler is not None:
                    scheduler.set_progress(control.progress if control is not None else 0.0)
                if ema is not None:
                    ema.update_parameters(accelerator.unwrap_model(model, keep_torch_compile=False))
            epoch_loss.add(loss, logits, masks)
            if step % 10 == 0 and accelerator.is_main_process:
                progress.update(task, loss=f"{loss.item():.4f}")
            progress.advance(task)
            if timer is not None:
                timer.mark("optimizer")
            if stopped:
                break
    if (stopped or steps < len(loader)) and hasattr(loader, "end"):
        loader.end()  # an accelerate loader left mid-epoch stays registered as active until told it ended
    loss, images = epoch_loss.total()
    return EpochStats(loss, time.perf_counter() - start, images, lr, optimizer_steps, stopped)


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
            "val_dice_ci95": result.dice_ci95 if result else None, "best": best, "seconds": stats.seconds,
            "images_per_s": stats.images_per_s, "lr": stats.lr}


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
    control = build_control(cfg, training, accelerator, progress)
    epochs = cfg.train.epochs if not cfg.train.max_steps else None  # a step limit runs as many epochs as it takes
    epoch = progress.epoch
    with control.clock.running():  # the budget counts training and validation, not start-up or the final evaluation
        while not (progress.stopped_early or control.progress >= 1.0 or (epochs is not None and epoch >= epochs)):
            epoch += 1
            run_epoch(epoch, cfg, training, score, saver, accelerator, control)
        if progress.stopped_early:
            logger.info(f"Early stopping after epoch {epoch}: no validation improvement since epoch "
                        f"{progress.best_epoch} ({cfg.train.early_stopping_patience} evaluations)")
    agree_on_steps(control, accelerator)
    if progress.stop_reason in ("budget", "max_steps"):
        used = control.clock.seconds / 60
        logger.info(f"Stopped after {control.steps} steps in {progress.epoch} epoch(s): "
                    + (f"budget of {cfg.train.budget_minutes:.3g} min spent ({used:.2f} min)" if progress.stop_reason
                       == "budget" else f"train.max_steps {control.total_steps} reached ({used:.2f} min)"))
    finish_run(cfg, training, score, saver, accelerator, control)
    accelerator.end_training()
    return run.path


def build_control(cfg: Config, training: Training, accelerator: Accelerator, progress: RunProgress) -> Control:
    """The run's stop rule and progress: ``train.max_steps`` or the epochs' steps, and ``train.budget_minutes``.

    A resumed run continues from the steps and budget seconds its progress recorded.
    """
    steps_per_epoch = math.ceil(len(training.loaders["train"]) / cfg.train.grad_accum_steps)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    budget = 60.0 * cfg.train.budget_minutes if cfg.train.budget_minutes > 0 else None
    return Control(accelerator, total, budget, steps=progress.control.get("steps", 0),
                   seconds_used=progress.control.get("seconds_used", 0.0),
                   step_limit="max_steps" if cfg.train.max_steps else "epochs")


def agree_on_steps(control: Control, accelerator: Accelerator) -> None:
    """Check that every process stopped after the same optimizer step (they decide together; see :class:`Control`).

    Raises:
        RuntimeError: the processes' step counts differ, naming them.
    """
    if accelerator.num_processes == 1:
        return
    steps = gather_object([control.steps])
    if len(set(steps)) > 1:
        raise RuntimeError(f"processes stopped after different steps: {', '.join(f'rank {r}: {s}' for r, s in enumerate(steps))}")


def run_epoch(epoch: int, cfg: Config, training: Training, score, saver: CheckpointSaver, accelerator: Accelerator,
              control: Control) -> None:
    """Train one epoch (or until ``control`` stops it), validate when due, write the checkpoints, history
    and training state of ``epoch``. The last epoch, stopped or not, is always validated."""
    run, progress, epochs = saver.run, saver.progress, cfg.train.epochs
    training.loaders["train"].set_epoch(epoch)
    training.datasets["train"].set_epoch(epoch)
    of = f"/{epochs}" if not cfg.train.max_steps and not cfg.train.budget_minutes else ""
    stats = train_one_epoch(training.model, training.loaders["train"], training.optimizer, training.loss_fn, accelerator,
                            cfg.train.channels_last, f"epoch {epoch}{of}", scheduler=training.scheduler,
                            ema=training.ema, control=control, augment=training.augment)
    tail_started = time.perf_counter()
    check_finite(stats, epoch, run, progress)
    logger.info(stats.line(epoch, epochs, control.progress if not of else None))
    last = control.stopped or (not cfg.train.max_steps and epoch == epochs)
    due = "val" in training.loaders and (last or epoch % cfg.train.eval_every == 0)
    started = time.perf_counter()
    result = score(training.logits, training.loaders["val"]) if due else None
    validation_seconds = time.perf_counter() - started
    progress.epoch = epoch
    progress.stop_reason = control.reason
    progress.control = control.state()
    best = saver.save(training.weights, cfg, epoch, result, write=accelerator.is_main_process)
    if result is not None:
        logger.info(f"Validation {result.line()}{' (best so far)' if best else ''}")
    progress.history.append({**history_record(epoch, stats, result, best), "val_seconds": validation_seconds,
                             "steps": control.steps, "progress": control.progress,
                             "budget_seconds_used": control.clock.seconds})
    accelerator.log({k: v for k, v in progress.history[-1].items() if isinstance(v, float)}, step=epoch)
    progress.stopped_early = not saver.patience_left(cfg.train.early_stopping_patience, cfg.train.eval_every)
    if accelerator.is_main_process:
        run.write_history(progress.history)
    run.save_state(accelerator, progress)
    if due:  # what the last epoch adds after its last step (validation, checkpoints, state): the budget keeps it in reserve
        control.reserve = time.perf_counter() - tail_started
