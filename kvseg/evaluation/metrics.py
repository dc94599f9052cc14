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


@dataclass
class SegmentationMetrics:
    """Accumulates confusion counts, per-image losses and a logit histogram over batches; see the module doc.

    The loss is not computed here: the caller passes the per-image values of the loss it optimises,
    so that the reported loss is always the training loss.
    """

    threshold: float = 0.5
    _counts: list[np.ndarray] = field(default_factory=list, repr=False)  # per batch: (B, 4) tp fp fn tn
    _losses: list[np.ndarray] = field(default_factory=list, repr=False)  # per batch: (B,) loss per image
    _histogram: torch.Tensor = field(default_factory=lambda: torch.zeros(2, HISTOGRAM_BINS, dtype=torch.int64), repr=False)

    @property
    def logit_threshold(self) -> float:
        """The probability threshold as a logit, log(t / (1 - t))."""
        return logit_of(self.threshold)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor | None = None) -> None:
        """Add a batch: ``logits`` (B, 1, H, W) float, ``masks`` (B, 1, H, W) in {0, 1}, ``losses`` (B,) or None."""
        logits = logits.detach().float()
        target = masks.to(device=logits.device, dtype=torch.bool)
        predicted = logits > self.logit_threshold
        dims = tuple(range(1, logits.ndim))
        tp = (predicted & target).sum(dims)
        fp = (predicted & ~target).sum(dims)
        fn = (~predicted & target).sum(dims)
        tn = (~predicted & ~target).sum(dims)
        self._counts.append(torch.stack([tp, fp, fn, tn], dim=1).cpu().numpy())
        if losses is not None:
            self._losses.append(losses.detach().double().cpu().numpy().reshape(-1))
        scaled = (torch.atan(logits / LOGIT_SCALE) / math.pi + 0.5) * HISTOGRAM_BINS  # monotone, in [0, BINS]
        bins = scaled.long().clamp_(0, HISTOGRAM_BINS - 1).flatten() + target.flatten().long() * HISTOGRAM_BINS
        self._histogram += torch.bincount(bins, minlength=2 * HISTOGRAM_BINS).view(2, -1).cpu()

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
        return ranking_scores(self._histogram[1].numpy(), self._histogram[0].numpy())

    def curves(self) -> dict:
        """Precision-recall and ROC curve points (see :func:`ranking_curves`)."""
        return ranking_curves(self._histogram[1].numpy(), self._histogram[0].numpy())


def logit_of(probability: float) -> float:
    """The logit log(p / (1 - p)) of a probability threshold in (0, 1): a pixel is positive when its logit is above it."""
    return math.log(probability / (1 - probability))
