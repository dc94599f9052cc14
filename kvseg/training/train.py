"""One epoch of training with accelerate: :func:`train_one_epoch`, and what it returns.

``Accelerator`` does device placement, DDP, mixed precision and gradient accumulation; every piece
of rank logic goes through it. Scoring is :func:`kvseg.evaluation.evaluate.evaluate`; the run around
the epochs is :func:`kvseg.training.run.run_training`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from kvseg.errors import KvsegError
from kvseg.runs.folder import Progress as RunProgress
from kvseg.runs.folder import RunDir
from kvseg.training.epoch_loss import EpochLoss
from kvseg.training.optim import ProgressSchedule
from kvseg.training.stopping import Control


class NonFiniteLossError(KvsegError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochStats:
    """One epoch of training: mean loss over all samples on all processes, wall seconds, images, learning rate.

    ``steps`` counts this process's optimizer steps (those the gradient scaler skipped under fp16 are
    not counted), ``batches`` the loader's batches it trained on; ``stopped`` is True when a
    :class:`Control` ended the epoch early (at its last batch too).
    """

    loss: float
    seconds: float
    images: int
    lr: float
    steps: int = 0
    stopped: bool = False
    batches: int = 0


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
    done: EpochStats | None = None,
) -> EpochStats:
    """One pass over ``loader`` (or its first ``max_steps`` batches), or until ``control`` says stop.

    After every optimizer step (not every micro-batch under gradient accumulation) ``control`` counts
    the step and says how far the run is and whether every process stops here; ``scheduler`` then
    sets the learning rate for that progress and ``ema`` averages the weights. A step the gradient
    scaler skipped (fp16, non-finite gradients: ``accelerator.optimizer_step_was_skipped``) changed no
    weight: it is not counted, the schedule does not advance and the average is not updated. The
    returned loss is averaged over all samples on all processes, each once
    (:class:`~kvseg.training.epoch_loss.EpochLoss`); ``lr`` is the learning rate of the epoch's last
    step. ``timer`` splits each step into :data:`PHASES`. ``augment`` turns a loader batch of uint8
    pairs into the augmented, normalised one on the device (``data.augment_on: device``).

    ``done`` is the part of this epoch trained before a preemption (``loader`` then holds the rest of
    the epoch's batches): its samples, loss, steps, batches and seconds are added to the result.
    """
    model.train()
    done = done or EpochStats(0.0, 0.0, 0, optimizer.param_groups[0]["lr"])
    start, lr, optimizer_steps, batches, stopped = time.perf_counter(), done.lr, done.steps, done.batches, False
    epoch_loss = EpochLoss(accelerator, loss_fn, carried=(done.loss, done.images))
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
                counted = not accelerator.optimizer_step_was_skipped
                lr, optimizer_steps = optimizer.param_groups[0]["lr"], optimizer_steps + counted
                stopped = control is not None and control.after_step(counted)
                if scheduler is not None and counted:
                    scheduler.set_progress(control.progress if control is not None else 0.0)
                if ema is not None and counted:
                    ema.update_parameters(accelerator.unwrap_model(model, keep_torch_compile=False))
            epoch_loss.add(loss, logits, masks)
            batches += 1
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
    return EpochStats(loss, done.seconds + time.perf_counter() - start, images, lr, optimizer_steps, stopped, batches)


def check_finite(stats: EpochStats, epoch: int, run: RunDir, progress: RunProgress) -> None:
    """Stop on a NaN or infinite epoch loss, naming the last checkpoint that exists."""
    if math.isfinite(stats.loss):
        return
    kept = (f"last good checkpoint: {run.last}, epoch {progress.epoch}" if progress.epoch
            else "no epoch completed, nothing was saved")
    raise NonFiniteLossError(f"epoch {epoch}: training loss is {stats.loss}; stopped ({kept}); "
                             "try a lower train.lr or --mixed-precision no")
