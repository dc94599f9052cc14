"""The training loss, built from the config; the same object is optimised and reported.

``train.loss`` names it; :func:`build_loss` returns a module mapping logits (B, 1, H, W) and
masks (B, 1, H, W) in {0, 1} (float) to a scalar.
"""

from __future__ import annotations

from torch import nn

from kvseg.config import TrainConfig

LOSSES = ("bce",)


def build_loss(cfg: TrainConfig) -> nn.Module:
    """The loss named by ``cfg.loss``.

    Raises:
        ValueError: an unknown loss name (the config check refuses it first).
    """
    if cfg.loss == "bce":
        return nn.BCEWithLogitsLoss()
    raise ValueError(f"unknown loss {cfg.loss!r}; expected one of {', '.join(LOSSES)}")
