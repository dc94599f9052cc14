"""The one evaluation path: run a logits function over a loader and score it.

Whatever produces the logits — the PyTorch model during training, the same model under test-time
augmentation, an ONNX Runtime session, a benchmark backend — is a :class:`LogitsFn`, and
:func:`evaluate` scores it on a split into an :class:`EvalResult`. Training, the report, export
verification and the benchmark's parity check all call :func:`evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from kvseg.evaluation.metrics import ConfusionMatrix, Processes, Scores, SegmentationMetrics, logit_of, scores_from_counts
from kvseg.evaluation.tta import with_tta
from kvseg.evaluation.uncertainty import bootstrap_interval


class LogitsFn(Protocol):
    """Normalised images (B, 3, H, W) float32 -> logits (B, 1, H, W) float32 on the same device."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def torch_logits(model: nn.Module, channels_last: bool = False) -> LogitsFn:
    """The logits function of a PyTorch model: eval mode, no gradients, float32 out.

    A model prepared by ``accelerate`` runs under its autocast; ``channels_last`` converts the
    input's memory layout as training does.
    """

    @torch.no_grad()
    def logits(images: torch.Tensor) -> torch.Tensor:
        if model.training:
            model.eval()
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return model(images).float()

    return logits


@dataclass
class Agreement:
    """How one logits function's outputs compare with a reference's on the same inputs."""

    max_abs_diff: float = 0.0
    mean_abs_diff: float = 0.0
    same_class: float = 1.0  # fraction of pixels on the same side of the threshold
    pixels: int = 0
    max_abs_reference: float = 0.0  # the largest |logit| of the reference: the scale a difference is judged at

    def update(self, logits: torch.Tensor, reference: torch.Tensor, threshold: float) -> None:
        """Add a batch of logits and the reference's logits for the same images (any equal shapes)."""
        diff = (logits.double() - reference.double()).abs()
        boundary = logit_of(threshold)
        same = int(((logits > boundary) == (reference > boundary)).sum())
        total = self.pixels + diff.numel()
        self.mean_abs_diff = (self.mean_abs_diff * self.pixels + float(diff.sum())) / total
        self.same_class = (self.same_class * self.pixels + same) / total
        self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))
        self.max_abs_reference = max(self.max_abs_reference, float(reference.abs().max()))
        self.pixels = total

    def merged(self, other: Agreement) -> Agreement:
        """The agreement over this one's pixels and ``other``'s together."""
        total = self.pixels + other.pixels
        return Agreement(max(self.max_abs_diff, other.max_abs_diff),
                         (self.mean_abs_diff * self.pixels + other.mean_abs_diff * other.pixels) / total,
                         (self.same_class * self.pixels + other.same_class * other.pixels) / total, total,
                         max(self.max_abs_reference, other.max_abs_reference))


@dataclass(frozen=True)
class ImageResult:
    """One image's scores: IoU, Dice, loss, and the instrument fraction of its mask and its prediction."""

    id: str
    iou: float
    dice: float
    loss: float | None
    true_fraction: float
    predicted_fraction: float


@dataclass
class EvalResult:
    """Scores of one logits function on one split; see :mod:`kvseg.evaluation.metrics` for the conventions.

    ``average_precision`` and ``roc_auc`` are None when undefined (a split without instrument or
    without background pixels); ``undefined`` says why. ``loss`` is the mean per-image value of the
    loss named ``loss_name`` (None when no loss was given).
    """

    loss: float | None
    loss_name: str | None
    per_image: Scores
    dataset: Scores
    average_precision: float | None
    roc_auc: float | None
    confusion_matrix: ConfusionMatrix
    threshold: float
    images: list[ImageResult]
    curves: dict
    transforms: list[str] = field(default_factory=list)  # test-time augmentation; [] for plain
    undefined: dict[str, str] = field(default_factory=dict)
    agreement: Agreement | None = None  # against the reference logits function, when one was given
    dice_ci95: list[float] | None = None  # 95% bootstrap interval of the per-image Dice (kvseg.evaluation.uncertainty)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def to_json(self) -> dict:
        """A JSON-ready dict (the form kept in metrics.json and checkpoints)."""
        out = asdict(self)
        out["num_images"] = self.num_images
        return out

    @classmethod
    def from_json(cls, values: dict) -> EvalResult:
        """Rebuild a result from :meth:`to_json`."""
        values = {k: v for k, v in values.items() if k != "num_images"}
        agreement = values.pop("agreement", None)
        return cls(
            **{**values, "per_image": Scores(**values["per_image"]), "dataset": Scores(**values["dataset"]),
               "confusion_matrix": ConfusionMatrix(**values["confusion_matrix"]),
               "images": [ImageResult(**row) for row in values["images"]]},
            agreement=Agreement(**agreement) if agreement else None,
        )

    def line(self) -> str:
        """One log line: loss, IoU under both conventions, Dice, AP, ROC AUC."""
        loss = f"Loss ({self.loss_name}): {self.loss:.4f}, " if self.loss is not None else ""
        ranking = ", ".join(
            f"{label}: {value:.4f}" if value is not None else f"{label}: undefined"
            for label, value in (("AP", self.average_precision), ("ROC AUC", self.roc_auc))
        )
        return (f"{loss}IoU: {self.per_image.iou:.4f} (per-image) {self.dataset.iou:.4f} (dataset), "
                f"Dice: {self.per_image.dice:.4f}, {ranking}")


def per_image_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor,
                   masks: torch.Tensor) -> torch.Tensor:
    """The loss of each image on its own, shape (B,): the batch mean of per-image losses is the reported loss."""
    target = masks.float()
    return torch.stack([loss_fn(logits[i : i + 1], target[i : i + 1]) for i in range(len(logits))]).float()


@torch.no_grad()
def evaluate(
    logits_fn: LogitsFn,
    loader: DataLoader,
    threshold: float = 0.5,
    loss_fn: nn.Module | None = None,
    loss_name: str | None = None,
    tta: Sequence[str] = (),
    processes: Processes | None = None,
    reference: LogitsFn | None = None,
    normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EvalResult:
    """Score ``logits_fn`` on every ``(images, masks, index)`` batch of ``loader``.

    Args:
        logits_fn: see :class:`LogitsFn`.
        loader: yields normalised images (B, 3, H, W) (or, with ``normalise``, what it takes),
            masks (B, 1, H, W) in {0, 1} and dataset indices (B,); ``loader.dataset.samples[index].id``
            names each image.
        threshold: probability above which a pixel is instrument.
        loss_fn: the training loss (``loss_fn(logits, masks) -> scalar``), evaluated per image.
        tta: dihedral transforms to average over (:mod:`kvseg.evaluation.tta`); empty for a plain evaluation.
        processes: the ``Accelerator`` under several processes, with ``loader`` prepared by it: each
            process scores its own images, and only counts move between them (per batch 8 numbers
            an image, whatever its size; at the end one all-reduce of the ranking histogram; see
            :meth:`SegmentationMetrics.update_across`). Every image is scored exactly once, padded
            duplicates left out, and every process returns the whole result.
        reference: a second logits function run on the same images (e.g. PyTorch fp32 against an
            ONNX model); their :class:`Agreement` is returned in ``result.agreement``.
        normalise: turns the loader's images into normalised float32 (B, 3, H, W) on the logits
            function's device, e.g. :meth:`kvseg.data.device_augment.DeviceBatches.normalise` for
            uint8 batches; None when the loader yields them normalised.

    Raises:
        ValueError: the loader yielded no batch.
    """
    if reference is not None and processes is not None:
        raise ValueError("a reference comparison runs in one process; do not pass processes with it")
    run = with_tta(logits_fn, tta) if tta else logits_fn
    metrics = SegmentationMetrics(threshold=threshold)
    agreement = Agreement() if reference is not None else None
    indices: list[int] = []
    for images, masks, index in loader:
        images = normalise(images) if normalise is not None else images
        logits = run(images).float()
        masks = masks.to(logits.device)
        losses = per_image_loss(loss_fn, logits, masks) if loss_fn is not None else None
        if agreement is not None:
            agreement.update(logits, reference(images).float(), threshold)
        if processes is None:
            metrics.update(logits, masks, losses)
            indices.extend(int(i) for i in index)
        else:
            indices.extend(metrics.update_across(processes, logits, masks, losses, index))
    if processes is not None:
        metrics.reduce_histogram(processes)
    if not indices:
        raise ValueError("the loader yielded no images to evaluate")
    return _result(metrics, [loader.dataset.samples[i].id for i in indices], loss_name, list(tta), agreement)


def _result(metrics: SegmentationMetrics, ids: list[str], loss_name: str | None, transforms: list[str],
            agreement: Agreement | None) -> EvalResult:
    counts = metrics.counts()
    tp, fp, fn, tn = counts.T.astype(np.float64)
    pixels = tp + fp + fn + tn
    per_image = metrics.per_image()
    losses = metrics.losses()
    images = [
        ImageResult(id=i, iou=float(per_image["iou"][k]), dice=float(per_image["dice"][k]),
                    loss=float(losses[k]) if losses is not None else None,
                    true_fraction=float((tp[k] + fn[k]) / pixels[k]), predicted_fraction=float((tp[k] + fp[k]) / pixels[k]))
        for k, i in enumerate(ids)
    ]
    average_precision, roc_auc = metrics.ranking()
    cm = metrics.confusion_matrix()
    undefined = {}
    if math.isnan(average_precision):
        undefined["average_precision"] = "the split has no foreground pixel"
    if math.isnan(roc_auc):
        undefined["roc_auc"] = "the split has no foreground pixel" if cm.tp + cm.fn == 0 else "the split has no background pixel"
    return EvalResult(
        loss=float(np.mean(losses)) if losses is not None else None,
        loss_name=loss_name,
        per_image=Scores.mean_of(per_image),
        dataset=metrics.dataset(),
        average_precision=None if math.isnan(average_precision) else average_precision,
        roc_auc=None if math.isnan(roc_auc) else roc_auc,
        confusion_matrix=cm,
        threshold=metrics.threshold,
        images=images,
        curves=metrics.curves(),
        transforms=transforms,
        undefined=undefined,
        agreement=agreement,
        dice_ci95=list(interval) if (interval := bootstrap_interval(per_image["dice"])) else None,
    )


@dataclass(frozen=True)
class ThresholdChoice:
    """The probability threshold with the highest mean per-image Dice on a split, and the whole curve."""

    value: float
    grid: list[float]
    dice: list[float]  # mean per-image Dice at each grid threshold


@torch.no_grad()
def tune_threshold(logits_fn: LogitsFn, loader: DataLoader, grid: Sequence[float], processes: Processes | None = None,
                   normalise: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ThresholdChoice:
    """Mean per-image Dice of ``logits_fn`` at every threshold of ``grid`` (probabilities), and the best one.

    Meant for the validation split, never the test split. Ties go to the threshold nearest 0.5.
    ``processes`` and ``normalise`` as in :func:`evaluate`: under several processes the per-image
    counts at every threshold (T x 4 an image) are gathered, never pixels.
    """
    boundaries = torch.tensor([logit_of(t) for t in grid])
    totals, images_seen = np.zeros(len(grid)), 0
    for images, masks, _ in loader:
        images = normalise(images) if normalise is not None else images
        logits = logits_fn(images).float().flatten(1)  # (B, P)
        target = masks.to(logits.device).bool().flatten(1)
        predicted = logits[None] > boundaries.to(logits.device)[:, None, None]  # (T, B, P)
        counts = torch.stack([(predicted & target).sum(-1), (predicted & ~target).sum(-1),
                              (~predicted & target).sum(-1), (~predicted & ~target).sum(-1)], dim=-1)  # (T, B, 4)
        counts = counts.transpose(0, 1).contiguous()  # (B, T, 4): gathered along the batch
        if processes is not None:
            counts = processes.gather_for_metrics(counts)
        tp, fp, fn, tn = counts.cpu().numpy().transpose(2, 1, 0)  # each (T, B)
        totals += scores_from_counts(tp, fp, fn, tn)["dice"].sum(axis=1)
        images_seen += tp.shape[1]
    if not images_seen:
        raise ValueError("the loader yielded no images to tune the threshold on")
    dice = totals / images_seen
    best = max(range(len(grid)), key=lambda k: (round(float(dice[k]), 12), -abs(grid[k] - 0.5)))
    return ThresholdChoice(float(grid[best]), [float(t) for t in grid], [float(d) for d in dice])
