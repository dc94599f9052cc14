"""The training loss, built from the config; the same object is optimised and reported.

``train.loss`` names it; :func:`build_loss` returns a module mapping logits (B, 1, H, W) float and
masks (B, 1, H, W) in {0, 1} (float) to a scalar. Besides PyTorch's BCE, the losses are MONAI's
(Cardoso et al., "MONAI: An open-source framework for deep learning in healthcare", 2022), so
their definitions are the ones its users know:

* ``bce``: ``torch.nn.BCEWithLogitsLoss`` — the study's loss.
* ``dice``: ``monai.losses.DiceLoss(sigmoid=True)``: 1 - soft Dice per image (Milletari et al., 2016),
  smoothing 1e-5, averaged over the batch.
* ``bce+dice``: ``monai.losses.DiceCELoss(sigmoid=True)``: soft Dice + BCE with equal weights.
* ``focal``: ``monai.losses.FocalLoss(gamma=2)``: sigmoid focal loss (Lin et al., 2017).
* ``tversky``: ``monai.losses.TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7)``: misses cost more than
  false alarms (Salehi et al., 2017), for thin instruments.
"""

from __future__ import annotations

from torch import nn

from kvseg.config import TrainConfig

LOSSES = ("bce", "dice", "bce+dice", "focal", "tversky")


def build_loss(cfg: TrainConfig) -> nn.Module:
    """The loss named by ``cfg.loss``.

    Raises:
        ValueError: an unknown loss name (the config check refuses it first).
    """
    if cfg.loss == "bce":
        return nn.BCEWithLogitsLoss()
    from monai.losses import DiceCELoss, DiceLoss, FocalLoss, TverskyLoss  # imported when used: MONAI loads slowly

    builders = {
        "dice": lambda: DiceLoss(sigmoid=True),
        "bce+dice": lambda: DiceCELoss(sigmoid=True),
        "focal": lambda: FocalLoss(gamma=2.0),
        "tversky": lambda: TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7),
    }
    if cfg.loss not in builders:
        raise ValueError(f"unknown loss {cfg.loss!r}; expected one of {', '.join(LOSSES)}")
    return builders[cfg.loss]()
