"""A training run with accelerate: set up, build, the epoch loop, the final evaluation.

:func:`run_training` reads top to bottom: set up (:mod:`kvseg.training.factory`), build, loop over
epochs (:func:`run_epoch`, one :func:`kvseg.training.train.train_one_epoch` each), finish
(:func:`finish_run`: the selected weights scored once on the test split).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from kvseg.config import Config
from kvseg.errors import CheckpointError, Preempted
from kvseg.evaluation.evaluate import EvalResult, evaluate
from kvseg.runs.folder import Progress as RunProgress
from kvseg.runs.folder import RunDir
from kvseg.training.distributed import check_process_group
from kvseg.training.factory import RunOptions, Training, build_accelerator, build_training, load_state, start_run
from kvseg.training.faults import FaultWatch
from kvseg.training.finish import finish_run
from kvseg.training.saver import CheckpointSaver
from kvseg.training.stopping import Control, StopSignals
from kvseg.training.train import EpochStats, check_finite, train_one_epoch

logger = logging.getLogger(__name__)


def history_record(epoch: int, stats: EpochStats, result: EvalResult | None, best: bool) -> dict:
    """One row of history.json (validation scores where the epoch was evaluated)."""
    return {"epoch": epoch, "train_loss": stats.loss, "val_loss": result.loss if result else None,
            "val_iou": result.per_image.iou if result else None, "val_dice": result.per_image.dice if result else None,
            "val_dice_ci95": result.dice_ci95 if result else None, "best": best, "seconds": stats.seconds,
            "images_per_s": stats.images_per_s, "lr": stats.lr}


def run_training(cfg: Config, options: RunOptions) -> Path:
    """Train ``cfg`` end to end and return the run folder; see the README for what it holds.

    While it trains, SIGUSR1 and SIGTERM stop every process after the same step; the run saves its
    resume state and raises :class:`~kvseg.errors.Preempted` (see :mod:`kvseg.training.stopping`).
    The final evaluation runs with the handlers found before: a signal then acts as it always does,
    and a resumed run evaluates again. With several processes, a failure on one ends every one with
    the same line and status, and a lost process ends the run within ``train.collective_timeout_s``
    (:mod:`kvseg.training.faults`).

    Raises:
        Preempted: a stop signal ended training; the same command with ``--resume auto`` continues it.
    """
    accelerator = build_accelerator(cfg, options.mixed_precision)
    check_process_group(accelerator.num_processes)
    with StopSignals() as signals:  # outside the watch: a failing process is not ended by the launcher's SIGTERM
        try:
            with FaultWatch(accelerator, cfg.train.collective_timeout_s):
                return train_and_evaluate(cfg, options, accelerator, signals)
        finally:
            accelerator.end_training()


def train_and_evaluate(cfg: Config, options: RunOptions, accelerator: Accelerator, signals: StopSignals) -> Path:
    """Set up, build, loop over the epochs, evaluate the selected weights: :func:`run_training`'s body.

    ``signals`` ask for a stop while the epochs run; they are restored before the final evaluation.
    """
    run, split, progress, state = start_run(cfg, options, accelerator)
    set_seed(cfg.train.seed)
    training = build_training(cfg, split, accelerator)
    control = build_control(cfg, training, accelerator, progress, signals)
    if state is not None:
        load_state(accelerator, state, progress)
        training.scheduler.set_progress(control.progress, count=False)  # this run's schedule, at the step reached
    saver = CheckpointSaver(run, progress, cfg.train.select_metric if "val" in training.loaders else None,
                            cfg.train.keep_every)
    score = partial(evaluate, threshold=cfg.train.threshold, loss_fn=training.loss_fn, loss_name=cfg.train.loss,
                    processes=accelerator, normalise=training.normalise)
    epochs = cfg.train.epochs if not cfg.train.max_steps else None  # a step limit runs as many epochs as it takes
    epoch = progress.epoch
    with control.clock.running():  # the budget counts training and validation, not start-up or the final evaluation
        # the limits of this launch decide (a resumed run may have more epochs, steps or budget)
        while not (progress.stopped_early or control.progress >= 1.0 or (epochs is not None and epoch >= epochs)):
            epoch += 1
            saved_in = run_epoch(epoch, cfg, training, score, saver, accelerator, control)
            if control.vote():  # a signal during validation or the save: the state of this epoch is whole
                raise preempted(run, control, f"the end of epoch {epoch}", saved_in)
    signals.restore()  # the final evaluation runs with the handlers found before
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
    return run.path


def build_control(cfg: Config, training: Training, accelerator: Accelerator, progress: RunProgress,
                  signals: StopSignals | None = None) -> Control:
    """The run's stop rule and progress: ``train.max_steps`` or the epochs' steps, and ``train.budget_minutes``;
    ``signals`` (preemption) stop it too.

    A resumed run continues from the steps and budget seconds its progress recorded.
    """
    steps_per_epoch = math.ceil(len(training.loaders["train"]) / cfg.train.grad_accum_steps)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    budget = 60.0 * cfg.train.budget_minutes if cfg.train.budget_minutes > 0 else None
    return Control(accelerator, total, budget, steps=progress.control.get("steps", 0),
                   seconds_used=progress.control.get("seconds_used", 0.0), reserve=progress.control.get("reserve", 0.0),
                   signals=signals, step_limit="max_steps" if cfg.train.max_steps else "epochs")


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


def preempted(run: RunDir, control: Control, where: str, saved_in: float) -> Preempted:
    """The one line a preempted run ends with: what stopped it, where, the state saved and how to go on."""
    return Preempted(f"{control.requested or 'a stop signal to another process'}: every process stopped after step "
                     f"{control.steps} ({where}) and saved the resume state in {run.state_dir()} ({saved_in:.1f} s); "
                     f"continue with --resume {run} (or --resume auto --run-name {run.path.name})")


def preempted_part(progress: RunProgress, epoch: int, batches: int, run: RunDir) -> EpochStats | None:
    """What of ``epoch`` was trained before a preemption stopped it (None when it starts afresh).

    Raises:
        CheckpointError: this launch cuts the epoch into another number of batches per process (another
            process count) than the one that was preempted.
    """
    if not progress.partial:
        return None
    part = dict(progress.partial)
    cut = part.pop("epoch_batches")
    if cut != batches:
        raise CheckpointError(f"{run}: epoch {epoch} was preempted after {part['batches']} of its {cut} batches per "
                              f"process; this launch cuts it into {batches} (another process count): resume it with "
                              "the process count it was started with")
    return EpochStats(**part)


def run_epoch(epoch: int, cfg: Config, training: Training, score, saver: CheckpointSaver, accelerator: Accelerator,
              control: Control) -> float:
    """Train one epoch (or until ``control`` stops it), validate when due, write the checkpoints, history
    and training state of ``epoch``; returns the seconds the state took to save. The last epoch, stopped
    or not, is always validated.

    An epoch that a preemption stopped before its last batch saves its state at that step (the part
    done in ``progress.partial``) and raises :class:`~kvseg.errors.Preempted`; resumed, it trains on
    from the next batch, in the same order (``skip_first_batches`` of the same sampler epoch).
    """
    run, progress, epochs = saver.run, saver.progress, cfg.train.epochs
    training.loaders["train"].set_epoch(epoch)
    training.datasets["train"].set_epoch(epoch)
    batches = len(training.loaders["train"])
    done = preempted_part(progress, epoch, batches, run)
    loader = accelerator.skip_first_batches(training.loaders["train"], done.batches) if done else training.loaders["train"]
    of = f"/{epochs}" if not cfg.train.max_steps and not cfg.train.budget_minutes else ""
    stats = train_one_epoch(training.model, loader, training.optimizer, training.loss_fn, accelerator,
                            cfg.train.channels_last, f"epoch {epoch}{of}", scheduler=training.scheduler,
                            ema=training.ema, control=control, augment=training.augment, done=done)
    tail_started = time.perf_counter()
    check_finite(stats, epoch, run, progress)
    if control.preempted and not control.stopped and stats.batches < batches:  # the run's own end comes first
        progress.partial = {**asdict(stats), "epoch_batches": batches}
        progress.control, started = control.state(), time.perf_counter()
        run.save_state(accelerator, progress)
        raise preempted(run, control, f"epoch {epoch}, batch {stats.batches} of {batches}", time.perf_counter() - started)
    logger.info(stats.line(epoch, epochs, control.progress if not of else None))
    last = control.stopped or (not cfg.train.max_steps and epoch == epochs)
    due = "val" in training.loaders and (last or epoch % cfg.train.eval_every == 0)
    started = time.perf_counter()
    result = score(training.logits, training.loaders["val"]) if due else None
    validation_seconds = time.perf_counter() - started
    progress.epoch, progress.partial = epoch, {}
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
    started = time.perf_counter()
    run.save_state(accelerator, progress)
    if due:  # what the last epoch adds after its last step (validation, checkpoints, state): the budget keeps it in reserve
        control.reserve = time.perf_counter() - tail_started
    return time.perf_counter() - started
