"""Optimizer, learning-rate schedule and weight averaging of a run, built from the config.

The schedule follows the run's *progress* p in [0, 1] (:class:`kvseg.training.stopping.Control`:
steps over the step limit, or the time budget spent, whichever binds first), set after every
optimizer step, so the last weights are annealed however many steps fit:

* ``none``: constant ``train.lr`` (the study's).
* ``cosine``: ``lr * (1 + cos(pi p)) / 2``, from ``train.lr`` to 0 (Loshchilov & Hutter, 2017).
* ``warmup_cosine``: linear from 1% of ``train.lr`` up over the first ``train.warmup_epochs`` epochs'
  steps, then cosine to 0 over the rest of the progress (Goyal et al., 2017).
* ``onecycle``: Smith & Topin's one-cycle policy as ``torch.optim.lr_scheduler.OneCycleLR`` defines it
  (``train.lr`` the peak at 30% of the progress, starting at ``lr / 25``, ending at ``lr / 25e4``,
  cosine annealing; Adam's beta1 cycled 0.95 -> 0.85 -> 0.95).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from kvseg.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the study's) or AdamW with ``cfg.lr`` and ``cfg.weight_decay``."""
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


class ProgressSchedule:
    """The learning rate of every parameter group as a function of progress (see the module docstring).

    Call :meth:`set_progress` after every optimizer step. ``state_dict`` holds the steps seen and where
    warm-up ended, so a resumed run continues the same curve; the step limit or budget behind the
    progress may change on resume (a longer run then anneals over its new length).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int = 0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
        self.optimizer, self.kind, self.warmup_steps = optimizer, kind, warmup_steps if kind == "warmup_cosine" else 0
        self.base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self.steps, self.warmup_end = 0, 0.0  # progress when warm-up ended
        self.set_progress(0.0, count=False)

    def factor(self, progress: float) -> float:
        """The multiple of ``train.lr`` at ``progress`` (after :attr:`steps` steps)."""
        p = min(max(progress, 0.0), 1.0)
        if self.kind == "none":
            return 1.0
        if self.kind == "onecycle":
            return _one_cycle(p)
        if self.kind == "warmup_cosine" and self.steps < self.warmup_steps:
            return 0.01 + 0.99 * self.steps / self.warmup_steps
        start = self.warmup_end if self.kind == "warmup_cosine" else 0.0
        q = (p - start) / (1.0 - start) if start < 1.0 else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(max(q, 0.0), 1.0)))

    def set_progress(self, progress: float, count: bool = True) -> None:
        """Set the learning rate for the next step; ``count`` one more optimizer step done."""
        if count:
            self.steps += 1
            if self.kind == "warmup_cosine" and self.steps == self.warmup_steps:
                self.warmup_end = progress
        factor = self.factor(progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
            if self.kind == "onecycle" and "betas" in group:
                group["betas"] = (_one_cycle_beta1(progress), group["betas"][1])

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "steps": self.steps, "warmup_end": self.warmup_end, "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.warmup_end = int(state["steps"]), float(state["warmup_end"])


SCHEDULES = ("none", "cosine", "warmup_cosine", "onecycle")
ONE_CYCLE_PEAK, ONE_CYCLE_DIV, ONE_CYCLE_FINAL_DIV = 0.3, 25.0, 1e4  # OneCycleLR's defaults


def _cos_between(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def _one_cycle(p: float) -> float:
    low, final = 1.0 / ONE_CYCLE_DIV, 1.0 / (ONE_CYCLE_DIV * ONE_CYCLE_FINAL_DIV)
    if p < ONE_CYCLE_PEAK:
        return _cos_between(low, 1.0, p / ONE_CYCLE_PEAK)
    return _cos_between(1.0, final, (p - ONE_CYCLE_PEAK) / (1.0 - ONE_CYCLE_PEAK))


def _one_cycle_beta1(p: float) -> float:
    if p < ONE_CYCLE_PEAK:
        return _cos_between(0.95, 0.85, p / ONE_CYCLE_PEAK)
    return _cos_between(0.85, 0.95, (p - ONE_CYCLE_PEAK) / (1.0 - ONE_CYCLE_PEAK))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> ProgressSchedule:
    """The schedule named by ``cfg.scheduler``; ``warmup_cosine`` warms up over ``cfg.warmup_epochs`` epochs' steps."""
    return ProgressSchedule(optimizer, cfg.scheduler, round(cfg.warmup_epochs * steps_per_epoch))


def build_ema(model: nn.Module, cfg: TrainConfig) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics, or None when off.

    ``torch.optim.swa_utils.AveragedModel`` with ``use_buffers=True``: the running statistics are
    averaged with the weights, so the averaged model is evaluated as it is.
    """
    if cfg.ema_decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
