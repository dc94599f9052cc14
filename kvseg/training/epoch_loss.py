"""The mean training loss of an epoch over every sample once, on every process.

With several processes accelerate evens out the last batches (``even_batches``): a process whose
share ends short is given samples from the start of the epoch again. Those duplicates are trained
on, but counted in the epoch's loss they would weigh some images twice. Every batch but the last
counts its loss times its size; the last batch's per-image losses go through
``gather_for_metrics``, which drops the duplicates. Every kvseg loss (:mod:`kvseg.models.losses`)
is the mean of per-image values, so the two agree where a batch holds no duplicate.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from kvseg.evaluation.evaluate import per_image_loss


class EpochLoss:
    """Sums the training loss of an epoch's batches (:meth:`add`) and gives the mean over its samples (:meth:`total`).

    ``carried`` is (mean loss, samples) of the part of the epoch trained before a preemption, over all
    processes: it is counted once in the total.
    """

    def __init__(self, accelerator: Accelerator, loss_fn: nn.Module, carried: tuple[float, int] = (0.0, 0)) -> None:
        self.accelerator, self.loss_fn = accelerator, loss_fn
        self._local = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # this process: sum, samples
        self._common = torch.tensor([carried[0] * carried[1], carried[1]], device=accelerator.device,
                                    dtype=torch.float64)  # the same on every process

    def add(self, loss: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor) -> None:
        """Count a batch: its loss (a scalar, the batch mean), its logits (B, 1, H, W) and masks (B, 1, H, W)."""
        if self.accelerator.num_processes > 1 and self.accelerator.gradient_state.end_of_dataloader:
            losses = self.accelerator.gather_for_metrics(per_image_loss(self.loss_fn, logits.detach().float(), masks))
            self._common[0] += losses.double().sum()
            self._common[1] += len(losses)
        else:  # in place, the count as a scalar: no copy to the device, no wait for it
            self._local[0] += loss.detach().double() * len(logits)
            self._local[1] += len(logits)

    def total(self) -> tuple[float, int]:
        """(mean loss, samples) of the epoch over all processes, each sample counted once (one all-reduce)."""
        summed = self.accelerator.reduce(self._local, reduction="sum") + self._common
        return float(summed[0] / summed[1]), int(summed[1])
