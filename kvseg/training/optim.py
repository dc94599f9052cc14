"""Optimizer, learning-rate schedule and weight averaging of a run, built from the config.

Schedules are PyTorch's own and step once per optimizer step, so warm-up and cosine decay are
smooth within an epoch:

* ``none``: constant ``train.lr`` (the study's).
* ``cosine``: ``CosineAnnealingLR`` from ``train.lr`` to 0 over the run (Loshchilov & Hutter, 2017).
* ``warmup_cosine``: ``LinearLR`` from 1% of ``train.lr`` up over ``train.warmup_epochs``, then cosine to 0
  (``SequentialLR``), as in Goyal et al., 2017.
* ``onecycle``: ``OneCycleLR`` with ``train.lr`` as the peak (Smith & Topin, 2019).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from kvseg.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the study's) or AdamW with ``cfg.lr`` and ``cfg.weight_decay``."""
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> lr_scheduler.LRScheduler:
    """The schedule named by ``cfg.scheduler``, over ``cfg.epochs * steps_per_epoch`` optimizer steps."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.scheduler == "warmup_cosine":
        warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
        if warmup < 1:
            return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return lr_scheduler.SequentialLR(
            optimizer,
            [lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
             lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)],
            milestones=[warmup],
        )
    if cfg.scheduler == "onecycle":
        return lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    return lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def build_ema(model: nn.Module, cfg: TrainConfig) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics, or None when off.

    ``torch.optim.swa_utils.AveragedModel`` with ``use_buffers=True``: the running statistics are
    averaged with the weights, so the averaged model is evaluated as it is.
    """
    if cfg.ema_decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
