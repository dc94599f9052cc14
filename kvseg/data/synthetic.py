"""A synthetic stand-in for Kvasir-Instrument, written to disk in the official layout.

Each image is an endoscopy-like scene: textured pink/red tissue with folds and vessels, a dark
vignette with the black corners of an endoscope, specular highlights, and one to three instruments
(shafts with forceps jaws or snare loops, or plain sheaths) with metallic shading entering from the
frame edge. Masks mark the instruments. Images are JPEG, masks PNG, ids in ``train.txt`` and
``test.txt`` — exactly what :mod:`kvseg.data.folder` reads for the real dataset.

The scenes are built so that no single colour threshold separates instrument from tissue: metal is
grey at every brightness, highlights on tissue are white, and the vignette darkens both.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import cv2
import numpy as np

import kvseg
from kvseg.config import DataConfig
from kvseg.errors import DatasetNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = DataConfig.root
SYNTHETIC_ROOT = "data/synthetic-kvasir-instrument"


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Zero-mean noise with features about ``cell`` pixels wide, roughly unit variance."""
    h, w = shape
    small = rng.normal(size=(max(2, h // cell), max(2, w // cell))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _tissue(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Pink/red mucosa with folds and vessels, float RGB in [0, 1]."""
    h, w = shape
    base = np.array([0.80, 0.38, 0.36]) + rng.uniform(-0.06, 0.06, size=3)
    texture = 0.07 * _smooth_noise(rng, shape, 24) + 0.035 * _smooth_noise(rng, shape, 6)
    image = base[None, None, :] + texture[..., None] * np.array([1.0, 0.8, 0.8])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(h, w)
    for _ in range(rng.integers(1, 4)):  # folds: soft dark bands
        angle = rng.uniform(0, np.pi)
        phase = np.cos(angle) * xx + np.sin(angle) * yy + 0.05 * _smooth_noise(rng, shape, 32)
        band = np.exp(-(((phase - rng.uniform(0.1, 0.9)) / rng.uniform(0.02, 0.06)) ** 2))
        image *= 1 - 0.35 * band[..., None]
    vessels = np.zeros(shape, np.float32)
    for _ in range(rng.integers(2, 6)):  # vessels: thin dark red random walks
        points = [rng.uniform([0, 0], [w, h])]
        for _ in range(8):
            points.append(points[-1] + rng.normal(scale=max(h, w) / 12, size=2))
        cv2.polylines(vessels, [np.array(points, np.int32)], False, 1.0, thickness=1, lineType=cv2.LINE_AA)
    image *= 1 - 0.3 * cv2.GaussianBlur(vessels, (3, 3), 0)[..., None] * np.array([0.3, 1.0, 1.0])
    if rng.random() < 0.5:  # mucus: translucent whitish-grey film
        film = np.clip(_smooth_noise(rng, shape, 20) - 0.8, 0, 1)[..., None] * rng.uniform(0.4, 0.9)
        image = image * (1 - film) + film * np.array([0.78, 0.74, 0.72])
    return image


def _segment_distance(xx: np.ndarray, yy: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every pixel to segment p0-p1, and the signed offset across it."""
    d = p1 - p0
    length2 = float(d @ d) + 1e-9
    t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / length2, 0, 1)
    px, py = p0[0] + t * d[0], p0[1] + t * d[1]
    across = ((xx - p0[0]) * d[1] - (yy - p0[1]) * d[0]) / np.sqrt(length2)
    return np.hypot(xx - px, yy - py), across


def _metal(rng: np.random.Generator, offset: np.ndarray, half_width: float) -> np.ndarray:
    """Cylinder shading across a shaft: bright ridge, dark rims, a grey or bluish tint."""
    u = np.clip(offset / half_width, -1, 1)
    light = 0.25 + 0.55 * np.sqrt(1 - u**2) + 0.5 * np.exp(-(((u + 0.35) / 0.15) ** 2))
    tint = rng.choice([np.array([0.75, 0.77, 0.80]), np.array([0.55, 0.62, 0.75]), np.array([0.35, 0.36, 0.38])])
    return np.clip(light[..., None] * tint * rng.uniform(0.7, 1.2), 0, 1)


def _instrument(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
    """Paint one instrument entering from a frame edge into ``image`` and ``mask`` (in place)."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    side = rng.integers(4)
    along = rng.uniform(0.1, 0.9)
    start = {0: (along * w, -10), 1: (w + 10, along * h), 2: (along * w, h + 10), 3: (-10, along * h)}[side]
    start = np.array(start, np.float32)
    target = np.array([rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h], np.float32)
    tip = start + (target - start) * rng.uniform(0.6, 1.3)
    half_width = rng.uniform(0.03, 0.07) * min(h, w)
    kind = rng.choice(["forceps", "snare", "sheath"])
    if kind == "snare":
        half_width *= 0.6

    reflect = rng.uniform(0.1, 0.45)  # metal mirrors the surrounding tissue

    def paint(region: np.ndarray, colour: np.ndarray) -> None:
        image[region] = (1 - reflect) * colour[region] + reflect * np.clip(1.15 * image[region], 0, 1)
        mask[region] = 1

    distance, across = _segment_distance(xx, yy, start, tip)
    paint(distance <= half_width, _metal(rng, across, half_width))

    direction = (tip - start) / (np.linalg.norm(tip - start) + 1e-9)
    angle = np.degrees(np.arctan2(direction[1], direction[0]))
    if kind == "forceps":
        opening = rng.uniform(10, 35)
        jaw_length = half_width * rng.uniform(1.8, 2.8)
        for sign in (-1, 1):
            jaw = np.zeros_like(mask)
            theta = np.radians(angle + sign * opening)
            centre = tip + jaw_length * np.array([np.cos(theta), np.sin(theta)])
            axes = (int(jaw_length), max(2, int(half_width * 0.55)))
            cv2.ellipse(jaw, tuple(int(v) for v in centre), axes, angle + sign * opening, 0, 360, 1, -1)
            jaw_offset = (xx - centre[0]) * np.sin(theta) - (yy - centre[1]) * np.cos(theta)
            paint(jaw > 0, _metal(rng, jaw_offset, axes[1] + 1))
    elif kind == "snare":
        loop = np.zeros_like(mask)
        radius = half_width * rng.uniform(3, 5)
        centre = tip + direction * radius
        axes = (int(radius), int(radius * rng.uniform(0.5, 0.9)))
        thickness = max(2, int(min(h, w) / 90))
        cv2.ellipse(loop, tuple(int(v) for v in centre), axes, angle, 0, 360, 1, thickness)
        paint(loop > 0, np.broadcast_to(np.array([0.85, 0.85, 0.88]) * rng.uniform(0.6, 1.0), image.shape))


def _vignette(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Radial fall-off of an endoscope's light, black beyond the lens circle."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2)) / np.sqrt(2)
    fall = np.clip(1 - rng.uniform(0.5, 0.9) * r**2, 0, 1)
    return fall * (r < rng.uniform(0.9, 1.05))


def _highlights(rng: np.random.Generator, image: np.ndarray) -> None:
    """White specular spots on the wet tissue (and on whatever lies beneath)."""
    h, w = image.shape[:2]
    spots = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(3, 12)):
        centre = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        axes = (int(rng.uniform(1, 0.04 * w)) + 1, int(rng.uniform(1, 0.025 * h)) + 1)
        cv2.ellipse(spots, centre, axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
    spots = cv2.GaussianBlur(spots, (5, 5), 0)[..., None]
    image[:] = image * (1 - spots) + 0.97 * spots


def make_example(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene: uint8 RGB image (H, W, 3) and uint8 {0, 1} mask (H, W)."""
    shape = (height, width)
    image = _tissue(rng, shape)
    mask = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(1, 4)):
        _instrument(rng, image, mask)
    _highlights(rng, image)
    vignette = _vignette(shape, rng)
    image = image * vignette[..., None]
    mask[vignette == 0] = 0  # nothing is visible outside the lens circle
    image = cv2.GaussianBlur(image.astype(np.float32), (3, 3), 0)
    image = image + rng.normal(scale=0.015, size=image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def _write_example(root: Path, name: str, seed: np.random.SeedSequence, height: int, width: int) -> None:
    image, mask = make_example(np.random.default_rng(seed), height, width)
    cv2.imwrite(str(root / "images" / f"{name}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
    cv2.imwrite(str(root / "masks" / f"{name}.png"), mask * 255)


def write_synthetic_dataset(
    root: str | Path,
    num_images: int = 200,
    size: int = 192,
    test_fraction: float = 0.2,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Write a Kvasir-Instrument-like dataset to ``root`` and return it.

    ``size`` is the image height; width is 5/4 of it, as in many endoscopy frames. Each image has a
    seed of its own drawn from ``seed``, so the same ``seed`` writes the same files whatever the
    number of ``workers`` (processes; default: one per core). Existing files are overwritten.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    sequence = np.random.SeedSequence(seed)
    image_seeds = sequence.spawn(num_images)
    width = int(round(size * 1.25))
    ids = [f"synth{i:04d}" for i in range(num_images)]
    workers = min(workers or os.cpu_count() or 1, num_images)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_example, repeat(root), ids, image_seeds, repeat(size), repeat(width), chunksize=8))
    else:
        for name, image_seed in zip(ids, image_seeds):
            _write_example(root, name, image_seed, size, width)
    n_test = min(num_images - 1, max(1, round(test_fraction * num_images)))
    order = np.random.default_rng(sequence.spawn(1)[0]).permutation(num_images)
    test = sorted(ids[i] for i in order[:n_test])
    train = sorted(ids[i] for i in order[n_test:])
    for filename, ids in (("train.txt", train), ("test.txt", test)):  # the official layout: no val.txt
        (root / filename).write_text("".join(f"{i}\n" for i in ids))
    return root


def resolve_data_root(cfg: DataConfig, explicit: bool, accelerator) -> Path:
    """The dataset folder to train on: ``cfg.root``, or the synthetic stand-in when nothing is there.

    Falls back to synthetic data only when ``cfg.root`` is the default location, it does not exist
    and no data folder was given explicitly (``explicit``). The stand-in is written once by the main
    process into a temporary folder renamed into place, and again only when its settings change
    (``synthetic.json`` records them).

    Raises:
        DatasetNotFoundError: an explicitly named folder does not exist.
    """
    root = Path(cfg.root)
    if root.exists():
        return root
    if explicit or cfg.root != DEFAULT_DATA_ROOT:
        raise DatasetNotFoundError(f"{root}: dataset folder not found (expected images/ and masks/ inside)")
    synthetic = Path(SYNTHETIC_ROOT)
    recipe = {"num_images": cfg.synthetic_images, "size": cfg.synthetic_size,
              "test_fraction": cfg.synthetic_test_fraction, "seed": cfg.split_seed}
    logger.info(f"No dataset at {root}; training on the synthetic stand-in in {synthetic}.")
    with accelerator.main_process_first():
        recipe_file = synthetic / "synthetic.json"
        stamp = {**recipe, "kvseg_version": kvseg.__version__}
        if accelerator.is_main_process and (not recipe_file.is_file() or json.loads(recipe_file.read_text()) != stamp):
            shutil.rmtree(synthetic, ignore_errors=True)
            tmp = synthetic.with_name(synthetic.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            write_synthetic_dataset(tmp, **recipe)
            (tmp / "synthetic.json").write_text(json.dumps(stamp, indent=2))
            tmp.rename(synthetic)
    return synthetic
