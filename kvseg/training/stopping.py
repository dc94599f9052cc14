"""When training stops, and how far along it is: a step limit, a time budget, a stop request (preemption).

:class:`Control` is asked after every optimizer step. It returns the run's *progress* in [0, 1],
which the learning-rate schedule follows (:class:`kvseg.training.optim.ProgressSchedule`), and
whether to stop now. Progress is whichever limit binds first:

* steps: optimizer steps done over the step limit (``train.max_steps``, else ``train.epochs`` times
  the steps of an epoch);
* time: budget seconds spent (training and validation, not start-up or the final evaluation) over
  ``train.budget_minutes``, less the time the last validation took (kept in reserve, so that the final
  validation fits in the budget).

With several processes only the main process's clock counts. Its reading and every process's stop
request are combined by one all-reduce per step, so every rank sees the same progress (the same
learning rate) and stops at the same step: ranks that decided on their own clocks would disagree by a
step and hang in the next collective.

A stop request is *preemption*: a cluster's scheduler (SLURM ``--signal=USR1@90``, then SIGTERM;
Kubernetes SIGTERM and a grace period) asks for the job back. :class:`StopSignals` turns SIGUSR1 and
SIGTERM into such a request; every rank then stops after the same step, the run saves its resume
state and exits with :data:`kvseg.errors.EXIT_PREEMPTED`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopSignals:
    """While entered, SIGUSR1 and SIGTERM record a stop request instead of ending the process.

    The handler only records the first signal's name in :attr:`received`: it is safe at any moment,
    and a second signal (during the save, say) changes nothing. It acts in the process that entered
    only: DataLoader workers forked meanwhile inherit it and ignore the signal (they end with their
    parent). Leaving restores the handlers found on entry; :meth:`restore` does so early. Outside
    the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals, self.received = signals, None
        self._previous: dict[signal.Signals, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous = {sig: signal.signal(sig, self._record) for sig in self.signals}
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the handlers found on entry: from here on the signals act as they did before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum: int, frame: object) -> None:
        if os.getpid() == self._pid and self.received is None:
            self.received = signal.Signals(signum).name


class Clock:
    """Seconds spent inside :meth:`running` blocks, summed (``time.perf_counter``)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self._seconds, self._since = seconds, None

    @property
    def seconds(self) -> float:
        return self._seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Count the time spent in the block (re-entering while running counts it once)."""
        if self._since is not None:
            yield
            return
        self._since = time.perf_counter()
        try:
            yield
        finally:
            self._seconds += time.perf_counter() - self._since
            self._since = None


class Control:
    """The stop decision and the schedule's progress, the same on every process (see the module docstring).

    A stop request (:meth:`request_stop`, or a signal caught by ``signals``) on any process sets
    :attr:`preempted` on every process at the same step; it is not a :attr:`reason`: the run is to
    continue later from that step.

    Args:
        accelerator: the run's accelerator (its process count decides whether a collective is needed).
        total_steps: the step limit; progress by steps is ``steps / total_steps``.
        budget_seconds: the time budget, or None for none.
        steps: optimizer steps already done (a resumed run).
        seconds_used: budget seconds already spent (a resumed run keeps the remainder).
        reserve: seconds of the last validation, kept for the final one (a resumed run keeps them).
        signals: the run's :class:`StopSignals`, whose signal is a stop request.
        step_limit: what the step limit is called in :attr:`reason` when it ends training (``epochs`` or ``max_steps``).
    """

    def __init__(self, accelerator: Accelerator, total_steps: int, budget_seconds: float | None = None,
                 steps: int = 0, seconds_used: float = 0.0, reserve: float = 0.0,
                 signals: StopSignals | None = None, step_limit: str = "epochs") -> None:
        self.accelerator, self.total_steps, self.budget_seconds = accelerator, max(1, total_steps), budget_seconds
        self.steps, self.clock, self.reserve, self.signals = steps, Clock(seconds_used), reserve, signals
        self.step_limit = step_limit
        self._requested: str | None = None  # a stop asked for on this process
        self.reason: str | None = None  # why training ended: the step limit's name or "budget"
        self.preempted = False  # some process asked to stop: every process stops and saves, to continue later
        self.progress = self._local_progress(self._time_fraction())

    @property
    def requested(self) -> str | None:
        """What asked this process to stop (a signal's name, or :meth:`request_stop`'s reason), if anything."""
        return self._requested or (self.signals.received if self.signals is not None else None)

    def _time_fraction(self) -> float:
        if self.budget_seconds is None:
            return 0.0
        return self.clock.seconds / max(self.budget_seconds - self.reserve, 1e-9)

    def _local_progress(self, time_fraction: float) -> float:
        return min(1.0, max(self.steps / self.total_steps, time_fraction))

    def request_stop(self, reason: str) -> None:
        """Ask every process to stop after the current step and save, to continue later."""
        self._requested = self._requested or reason

    def after_step(self, counted: bool = True) -> bool:
        """Count one optimizer step (unless it was not ``counted``: the gradient scaler skipped it); update
        :attr:`progress`; True when every process is to stop now (the run's end, or preemption)."""
        self.steps += counted
        time_fraction = self._time_fraction() if self.accelerator.is_main_process else 0.0
        votes = 1.0 if self.requested else 0.0
        if self.accelerator.num_processes > 1:
            shared = torch.tensor([time_fraction, votes], dtype=torch.float64, device=self.accelerator.device)
            time_fraction, votes = (float(v) for v in self.accelerator.reduce(shared, reduction="sum"))
        self.progress = self._local_progress(time_fraction)
        if self.steps >= self.total_steps:
            self.reason = self.step_limit
        elif self.budget_seconds is not None and time_fraction >= 1.0:
            self.reason = "budget"
        self.preempted = self.preempted or votes > 0
        return self.reason is not None or self.preempted

    def vote(self) -> bool:
        """Between epochs: True on every process when any process asked to stop (sets :attr:`preempted`)."""
        if not self.preempted:
            votes = torch.tensor([1.0 if self.requested else 0.0], dtype=torch.float64, device=self.accelerator.device)
            self.preempted = float(self.accelerator.reduce(votes, reduction="sum")) > 0
        return self.preempted

    @property
    def stopped(self) -> bool:
        """True once the run has reached its end (:attr:`reason`)."""
        return self.reason is not None

    def state(self) -> dict:
        """What a resumed run needs: steps done, budget seconds spent, the validation time kept in reserve."""
        return {"steps": self.steps, "seconds_used": self.clock.seconds, "reserve": self.reserve}


def parse_duration(text: str) -> float:
    """Minutes in ``text``: ``30m``, ``1.5h``, ``90s``, ``1h30m`` or a plain number of minutes.

    Raises:
        ValueError: ``text`` is none of these, or not positive.
    """
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        minutes = float(value)
    else:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s)?", value)
        if not value or not parts or not any(parts.groups()):
            raise ValueError(f"{text!r} is not a duration; expected e.g. 30m, 1.5h, 90s or a number of minutes")
        hours, mins, secs = (float(g) if g else 0.0 for g in parts.groups())
        minutes = 60 * hours + mins + secs / 60
    if not minutes > 0:
        raise ValueError(f"{text!r}: expected a positive duration")
    return minutes
