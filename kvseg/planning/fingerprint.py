"""A dataset's fingerprint: what the plan needs to know of a folder, read by the folder check.

nnU-Net's planner starts from a dataset fingerprint (image sizes, spacings, intensities); kvseg's
frames have no spacing, and what decides a plan here is how many frames there are, how large they
are, and how small the objects are at the resolutions a budget can afford.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from kvseg.data.check import FolderReport


@dataclass(frozen=True)
class Fingerprint:
    """Counts, sizes and foreground of a folder.

    ``short_side`` is the median of the images' shorter sides in pixels; ``fraction_*`` are
    percentiles of the foreground fraction of a mask (all its foreground pixels together);
    ``train``, ``val`` and ``test`` are the split's sizes.
    """

    root: str
    images: int
    short_side: int
    long_side: int
    fraction_p05: float
    fraction_median: float
    empty_masks: int
    train: int
    val: int
    test: int

    @classmethod
    def of(cls, report: FolderReport) -> Fingerprint:
        """The fingerprint of a folder the check has read (``report.ok`` is assumed)."""
        sizes = np.array([r.image_size for r in report.records if r.image_size is not None] or [(0, 0)])
        fractions = np.array([f for f in report.fractions.values() if f > 0] or [0.0])
        split = report.split
        return cls(str(report.root), len(report.records), int(np.median(sizes.min(axis=1))),
                   int(np.median(sizes.max(axis=1))), float(np.percentile(fractions, 5)), float(np.median(fractions)),
                   sum(1 for f in report.fractions.values() if f == 0), len(split.train) if split else 0,
                   len(split.val) if split else 0, len(split.test) if split else 0)

    def object_pixels(self, image_size: int, quantile: str = "p05") -> float:
        """Side in pixels of a square with the foreground area of a small (``p05``) or typical (``median``) mask,
        at ``image_size`` x ``image_size``: sqrt(fraction) x image_size."""
        fraction = self.fraction_p05 if quantile == "p05" else self.fraction_median
        return math.sqrt(max(fraction, 0.0)) * image_size

    def lines(self) -> list[str]:
        return [f"folder {self.root}: {self.images} pairs, median {self.short_side} px short side "
                f"({self.long_side} px long); split {self.train} train / {self.val} validation / {self.test} test",
                f"foreground per mask: median {self.fraction_median:.3f}, 5th percentile {self.fraction_p05:.4f} of the "
                f"pixels ({self.empty_masks} empty masks); a 5th-percentile object is "
                f"{self.object_pixels(128):.0f} px across at 128 px, {self.object_pixels(256):.0f} px at 256"]

    def to_json(self) -> dict:
        return asdict(self)
