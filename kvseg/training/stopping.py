"""When training stops, and how far along it is: a step limit, a time budget, a stop request (e.g. preemption).

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
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import torch
from accelerate import Accelerator


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

    Args:
        accelerator: the run's accelerator (its process count decides whether a collective is needed).
        total_steps: the step limit; progress by steps is ``steps / total_steps``.
        budget_seconds: the time budget, or None for none.
        steps: optimizer steps already done (a resumed run).
        seconds_used: budget seconds already spent (a resumed run keeps the remainder).
        step_limit: what the step limit is called in :attr:`reason` when it ends training (``epochs`` or ``max_steps``).
    """

    def __init__(self, accelerator: Accelerator, total_steps: int, budget_seconds: float | None = None,
                 steps: int = 0, seconds_used: float = 0.0, step_limit: str = "epochs") -> None:
        self.accelerator, self.total_steps, self.budget_seconds = accelerator, max(1, total_steps), budget_seconds
        self.step_limit = step_limit
        self.steps, self.clock = steps, Clock(seconds_used)
        self.reserve = 0.0  # seconds of the last validation, kept for the final one
        self.requested: str | None = None  # a stop asked for on this process (set from a signal handler)
        self.reason: str | None = None  # why training stopped: the step limit's name, "budget" or what was requested
        self.progress = self._local_progress(self._time_fraction())

    def _time_fraction(self) -> float:
        if self.budget_seconds is None:
            return 0.0
        return self.clock.seconds / max(self.budget_seconds - self.reserve, 1e-9)

    def _local_progress(self, time_fraction: float) -> float:
        return min(1.0, max(self.steps / self.total_steps, time_fraction))

    def request_stop(self, reason: str) -> None:
        """Ask every process to stop after the current step (safe to call from a signal handler)."""
        self.requested = self.requested or reason

    def after_step(self) -> bool:
        """Count one optimizer step; update :attr:`progress`; True when every process is to stop now."""
        self.steps += 1
        time_fraction = self._time_fraction() if self.accelerator.is_main_process else 0.0
        votes = 1.0 if self.requested else 0.0
        if self.accelerator.num_processes > 1:
            shared = torch.tensor([time_fraction, votes], dtype=torch.float64, device=self.accelerator.device)
            time_fraction, votes = (float(v) for v in self.accelerator.reduce(shared, reduction="sum"))
        self.progress = self._local_progress(time_fraction)
        if votes:
            self.reason = self.requested or "requested"
        elif self.steps >= self.total_steps:
            self.reason = self.step_limit
        elif self.budget_seconds is not None and time_fraction >= 1.0:
            self.reason = "budget"
        return self.reason is not None

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    def state(self) -> dict:
        """What a resumed run needs: steps done and budget seconds spent."""
        return {"steps": self.steps, "seconds_used": self.clock.seconds}


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
