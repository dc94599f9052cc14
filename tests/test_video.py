"""Video: python -m kvseg.predict on video files and live sources, the streaming pipeline, the benchmark row."""

from __future__ import annotations

import numpy as np

from kvseg.plots import overlay


def test_overlay_blends_each_layer_with_its_colour() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    truth, predicted = rng.random((48, 64)) < 0.5, rng.random((48, 64)) < 0.5
    alpha = 0.45
    expected = image.astype(np.float64)
    for where, colour in [(predicted, (255, 0, 80))]:
        expected[where] = (1 - alpha) * expected[where] + alpha * np.array(colour)
    out = overlay(image, None, predicted, alpha)
    assert np.abs(out.astype(int) - expected.round()).max() <= 1  # OpenCV rounds the same blend
    assert np.array_equal(out[~predicted], image[~predicted])
    layered = overlay(image, truth, predicted, alpha)
    missed = truth & ~predicted
    assert np.abs(layered[missed].astype(int) - ((1 - alpha) * image[missed] + alpha * np.array((0, 255, 0))).round()).max() <= 1
    assert np.array_equal(layered[~truth & ~predicted], image[~truth & ~predicted])
