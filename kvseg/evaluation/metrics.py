"""Segmentation metrics from logits and masks, accumulated batch by batch in bounded memory.

Two conventions, named in every result:

* ``dataset``: pixels summed over the whole set, then one score (one confusion matrix).
* ``per_image``: one score per image, then the mean — the convention of the published
  Kvasir-Instrument results.

Where a score's denominator is zero (e.g. IoU of an empty mask and an empty prediction), the score
is 1.0 if prediction and mask agree on every pixel of the image and 0.0 otherwise.

Average precision and ROC AUC rank pixels by logit. Logits are counted in a histogram of
:data:`HISTOGRAM_BINS` bins, equal steps of ``atan(logit / LOGIT_SCALE)``: about 0.0002 wide in logit
near 0 and still 0.02 wide at logit 40, with no clamping. Memory does not grow with the number of
pixels; the scores then follow scikit-learn's definitions (``average_precision_score``,
``roc_auc_score``) with each bin as one threshold. The tests check the binned scores against
scikit-learn's exact ones to within 1e-3, saturated logits included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

HISTOGRAM_BINS = 2**16
LOGIT_SCALE = 4.0
SCORES = ("iou", "dice", "precision", "recall", "accuracy", "specificity")


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray, agree: np.ndarray) -> np.ndarray:
    """numerator / denominator, with 1.0 where the denominator is 0 and ``agree``, else 0.0."""
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    out = np.where(agree, 1.0, 0.0)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def scores_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> dict[str, np.ndarray]:
    """IoU, Dice, precision, recall, accuracy and specificity from confusion counts (any shape)."""
    tp, fp, fn, tn = (np.asarray(v, dtype=np.int64) for v in (tp, fp, fn, tn))
    agree = (fp == 0) & (fn == 0)
    return {
        "iou": _safe_ratio(tp, tp + fp + fn, agree),
        "dice": _safe_ratio(2 * tp, 2 * tp + fp + fn, agree),
        "precision": _safe_ratio(tp, tp + fp, agree),
        "recall": _safe_ratio(tp, tp + fn, agree),
        "accuracy": _safe_ratio(tp + tn, tp + fp + fn + tn, agree),
        "specificity": _safe_ratio(tn, tn + fp, agree),
    }


def _operating_points(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each non-empty bin, from the highest score down."""
    pos = positives[::-1].astype(np.float64)
    neg = negatives[::-1].astype(np.float64)
    used = (pos + neg) > 0
    return np.cumsum(pos)[used], np.cumsum(neg)[used]


def ranking_scores(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    """(average precision, ROC AUC) from per-bin counts of positive and negative pixels.

    Bins are ordered by increasing score; each non-empty bin is one threshold. NaN when the set has
    no positive (both) or no negative (AUC) pixel.
    """
    tps, fps = _operating_points(positives, negatives)
    total_pos, total_neg = (tps[-1], fps[-1]) if len(tps) else (0.0, 0.0)
    if total_pos == 0:
        return math.nan, math.nan
    recall = tps / total_pos
    precision = tps / (tps + fps)
    average_precision = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    if total_neg == 0:
        return average_precision, math.nan
    tpr = np.concatenate([[0.0], recall])
    fpr = np.concatenate([[0.0], fps / total_neg])
    return average_precision, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def ranking_curves(positives: np.ndarray, negatives: np.ndarray, max_points: int = 256) -> dict:
    """Precision-recall and ROC curves, thinned to at most ``max_points`` points each (for plots)."""
    tps, fps = _operating_points(positives, negatives)
    if not len(tps) or tps[-1] == 0 or fps[-1] == 0:
        return {"recall": [], "precision": [], "fpr": [], "tpr": []}
    keep = np.unique(np.linspace(0, len(tps) - 1, min(max_points, len(tps))).round().astype(int))
    tps, fps = tps[keep], fps[keep]
    rounded = lambda a: [round(float(v), 6) for v in a]  # noqa: E731
    return {
        "recall": rounded(tps / tps[-1]),
        "precision": rounded(tps / (tps + fps)),
        "fpr": rounded(np.concatenate([[0.0], fps / fps[-1]])),
        "tpr": rounded(np.concatenate([[0.0], tps / tps[-1]])),
    }


@dataclass(frozen=True)
class Scores:
    """The six overlap scores of :data:`SCORES`, each in [0, 1]."""

    iou: float
    dice: float
    precision: float
    recall: float
    accuracy: float
    specificity: float

    @classmethod
    def mean_of(cls, per_image: dict[str, np.ndarray]) -> Scores:
        """The mean of per-image score arrays (the ``per_image`` convention)."""
        return cls(**{name: float(np.mean(per_image[name])) for name in SCORES})


@dataclass(frozen=True)
class ConfusionMatrix:
    """Pixel counts over a whole split: true negatives, false positives, false negatives, true positives."""

    tn: int
    fp: int
    fn: int
    tp: int


class Processes(Protocol):
    """What a distributed evaluation needs of the process group; ``accelerate.Accelerator`` is one."""

    process_index: int

    def gather_for_metrics(self, data: torch.Tensor) -> torch.Tensor: ...

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor: ...


def confusion_counts(logits: torch.Tensor, masks: torch.Tensor, logit_threshold: float) -> torch.Tensor:
    """Per-image tp, fp, fn, tn (B, 4) int64 of ``logits`` (B, 1, H, W) against ``masks`` (B, 1, H, W) in {0, 1}."""
    target = masks.to(device=logits.device, dtype=torch.bool)
    predicted = logits > logit_threshold
    dims = tuple(range(1, logits.ndim))
    return torch.stack([(predicted & target).sum(dims), (predicted & ~target).sum(dims),
                        (~predicted & target).sum(dims), (~predicted & ~target).sum(dims)], dim=1)


@dataclass
class SegmentationMetrics:
    """Accumulates confusion counts, per-image losses and a logit histogram over batches; see the module doc.

    The loss is not computed here: the caller passes the per-image values of the loss it optimises,
    so that the reported loss is always the training loss. The histogram stays on the device of
    the logits until it is read.
    """

    threshold: float = 0.5
    _counts: list[np.ndarray] = field(default_factory=list, repr=False)  # per batch: (B, 4) tp fp fn tn
    _losses: list[np.ndarray] = field(default_factory=list, repr=False)  # per batch: (B,) loss per image
    _histogram: torch.Tensor | None = field(default=None, repr=False)  # (2, BINS) int64: negatives, positives

    @property
    def logit_threshold(self) -> float:
        """The probability threshold as a logit, log(t / (1 - t))."""
        return logit_of(self.threshold)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor | None = None) -> None:
        """Add a batch: ``logits`` (B, 1, H, W) float, ``masks`` (B, 1, H, W) in {0, 1}, ``losses`` (B,) or None."""
        logits = logits.detach().float()
        self.add_counts(confusion_counts(logits, masks, self.logit_threshold), losses)
        self.add_histogram(logits, masks)

    def add_counts(self, counts: torch.Tensor, losses: torch.Tensor | None = None) -> None:
        """Add images by their confusion counts (B, 4) (:func:`confusion_counts`) and losses (B,) or None."""
        self._counts.append(counts.long().cpu().numpy())
        if losses is not None:
            self._losses.append(losses.detach().double().cpu().numpy().reshape(-1))

    @torch.no_grad()
    def add_histogram(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        """Count every pixel of ``logits`` (B, 1, H, W) in the ranking histogram, by its mask value."""
        logits = logits.detach().float()
        target = masks.to(device=logits.device, dtype=torch.bool)
        scaled = (torch.atan(logits / LOGIT_SCALE) / math.pi + 0.5) * HISTOGRAM_BINS  # monotone, in [0, BINS]
        bins = scaled.long().clamp_(0, HISTOGRAM_BINS - 1).flatten() + target.flatten().long() * HISTOGRAM_BINS
        counted = torch.bincount(bins, minlength=2 * HISTOGRAM_BINS).view(2, -1)
        self._histogram = counted if self._histogram is None else self._histogram + counted.to(self._histogram.device)

    @torch.no_grad()
    def update_across(self, processes: Processes, logits: torch.Tensor, masks: torch.Tensor,
                      losses: torch.Tensor | None, index: torch.Tensor) -> list[int]:
        """Add this process's batch of a distributed evaluation; returns the dataset indices of the images added.

        Every process gathers the batch's per-image record — counts, loss, dataset index, and which
        process holds the image at which position: 8 float64 numbers an image, whatever its size —
        through ``gather_for_metrics``, which drops the duplicates that even out the last batches
        (accelerate's ``even_batches``). Each process then adds every image's counts and loss, in
        the order of the gathered rows, and only its own surviving images' pixels to its
        histogram; :meth:`reduce_histogram` sums the histograms once at the end.
        """
        logits = logits.detach().float()
        n = len(logits)
        origin = torch.stack([torch.full((n,), float(processes.process_index)), torch.arange(n, dtype=torch.float64)], 1)
        loss_column = losses.double().reshape(-1, 1) if losses is not None else torch.full((n, 1), math.nan)
        record = torch.cat([confusion_counts(logits, masks, self.logit_threshold).double(), loss_column.to(logits.device),
                            torch.as_tensor(index).double().reshape(-1, 1).to(logits.device), origin.to(logits.device)], 1)
        rows = processes.gather_for_metrics(record.contiguous()).cpu()  # (N, 8): tp fp fn tn loss index process position
        self.add_counts(rows[:, :4].long(), rows[:, 4] if losses is not None else None)
        own = rows[rows[:, 6] == processes.process_index, 7].long().to(logits.device)  # may be none: all padding
        self.add_histogram(logits[own], masks.to(logits.device)[own])
        return rows[:, 5].long().tolist()

    def reduce_histogram(self, processes: Processes) -> None:
        """Sum the histograms of every process (one all-reduce of 2 x :data:`HISTOGRAM_BINS` int64) into each."""
        if self._histogram is None:
            self._histogram = torch.zeros(2, HISTOGRAM_BINS, dtype=torch.int64)
        self._histogram = processes.reduce(self._histogram, reduction="sum")

    def histogram(self) -> np.ndarray:
        """The ranking histogram (2, :data:`HISTOGRAM_BINS`) int64: row 0 background pixels, row 1 instrument pixels."""
        if self._histogram is None:
            return np.zeros((2, HISTOGRAM_BINS), np.int64)
        return self._histogram.cpu().numpy()

    @property
    def num_images(self) -> int:
        return sum(len(c) for c in self._counts)

    def counts(self) -> np.ndarray:
        """Per-image confusion counts (N, 4): tp, fp, fn, tn, in the order the images were added."""
        return np.concatenate(self._counts) if self._counts else np.zeros((0, 4), np.int64)

    def losses(self) -> np.ndarray | None:
        """Per-image losses (N,), or None when no loss was passed."""
        return np.concatenate(self._losses) if self._losses else None

    def per_image(self) -> dict[str, np.ndarray]:
        """Every score for each image (arrays of shape (N,)), in the order the images were added."""
        return scores_from_counts(*self.counts().T)

    def confusion_matrix(self) -> ConfusionMatrix:
        tp, fp, fn, tn = (int(v) for v in self.counts().sum(axis=0))
        return ConfusionMatrix(tn=tn, fp=fp, fn=fn, tp=tp)

    def dataset(self) -> Scores:
        """Scores of the pixels summed over the whole set (the ``dataset`` convention)."""
        cm = self.confusion_matrix()
        return Scores(**{k: float(v) for k, v in scores_from_counts(cm.tp, cm.fp, cm.fn, cm.tn).items()})

    def ranking(self) -> tuple[float, float]:
        """(average precision, ROC AUC); NaN where undefined (see :func:`ranking_scores`)."""
        histogram = self.histogram()
        return ranking_scores(histogram[1], histogram[0])

    def curves(self) -> dict:
        """Precision-recall and ROC curve points (see :func:`ranking_curves`)."""
        histogram = self.histogram()
        return ranking_curves(histogram[1], histogram[0])


def logit_of(probability: float) -> float:
    """The logit log(p / (1 - p)) of a probability threshold in (0, 1): a pixel is positive when its logit is above it."""
    return math.log(probability / (1 - probability))
