"""Drawing a mask over its image, for the report's figures, ``predict`` and the overlay video (OpenCV only).

Kept apart from :mod:`kvseg.evaluation.plots` so that predicting an image or a video never loads matplotlib.
"""

from __future__ import annotations

import cv2
import numpy as np

PREDICTED = (255, 0, 80)  # RGB tint of a prediction without ground truth
AGREED, MISSED, EXTRA = (255, 230, 0), (0, 255, 0), (255, 0, 255)  # yellow, green, magenta


def overlay(image: np.ndarray, truth: np.ndarray | None, predicted: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 image with the prediction over it; with ``truth``: agreement yellow, missed green, extra magenta.

    Args:
        image: RGB uint8 (H, W, 3).
        truth: ground-truth mask (H, W), any dtype read as bool, or None.
        predicted: predicted mask (H, W), read as bool.
        alpha: weight of the tint.

    Blended by OpenCV over the whole image, then copied where each layer is: a 720p video frame
    takes a few milliseconds (boolean indexing in float32 took 30-80 ms), with the same pixels.
    """
    predicted = predicted.astype(bool)
    if truth is None:
        layers = [(predicted, PREDICTED)]
    else:
        truth = truth.astype(bool)
        layers = [(truth & predicted, AGREED), (truth & ~predicted, MISSED), (~truth & predicted, EXTRA)]
    out = image.copy()
    for where, colour in layers:
        tinted = cv2.addWeighted(image, 1 - alpha, np.full_like(image, colour), alpha, 0.0)
        cv2.copyTo(tinted, where.view(np.uint8), out)
    return out
