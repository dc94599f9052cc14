"""How sure a per-image mean is: a bootstrap confidence interval over the images of a split.

A split of 36 validation frames gives a per-image Dice whose 95% interval is several hundredths
wide, so two epochs 0.02 apart may be the same model as far as the split can tell. The percentile
bootstrap (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13): resample the
images with replacement, take the mean of each resample, and read the 2.5th and 97.5th percentiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def bootstrap_interval(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float] | None:
    """The percentile-bootstrap interval of the mean of ``values`` (e.g. per-image Dice), or None for fewer than 2.

    Deterministic for a seed. Its width shrinks about as 1 / sqrt(len(values)).
    """
    scores = np.asarray(values, dtype=np.float64)
    if scores.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, scores.size, size=(resamples, scores.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def within(interval: tuple[float, float] | None, scores: dict[int, float]) -> list[int]:
    """The keys of ``scores`` (epochs) whose score lies inside ``interval``, in order."""
    if interval is None:
        return []
    low, high = interval
    return sorted(key for key, value in scores.items() if value is not None and low <= value <= high)
