"""Augmentation per batch on the device (data.augment_on: device) against the albumentations pipeline of the workers.

The device path must do what the workers' pipeline does: the same geometry for a given draw, the
same distribution of draws (rotation angles, quarter turns, flips, transposes, zero fill), masks
that move with their images and stay {0, 1}, and the eval pipeline's normalisation. Run on the CPU.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from kvseg.config import AugmentConfig
from kvseg.data.augment import build_eval_transform, build_train_transform
from kvseg.data.dataset import SegmentationDataset
from kvseg.data.device_augment import DeviceBatches, dihedral, draw_parameters, rotate
from kvseg.data.folder import Sample
from kvseg.data.synthetic import write_synthetic_dataset

ONLY_ROTATION = {"rotate_p": 0.5, "rotate90_p": 0.0, "hflip_p": 0.0, "vflip_p": 0.0, "transpose_p": 0.0}
NO_ROTATION = {"rotate_p": 0.0}
SAMPLES = 2000


def _texture(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An image with a different ramp in each channel and an asymmetric mask."""
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([xx * 4 % 256, yy * 4 % 256, (xx + yy) * 2 % 256], -1).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[8:40, 10:20] = 1
    mask[30:36, 20:56] = 1
    return image, mask


def _unnormalise(images: torch.Tensor, cfg: AugmentConfig) -> np.ndarray:
    """Normalised (N, 3, S, S) -> 0-255 values (N, S, S, 3)."""
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).permute(0, 2, 3, 1).numpy()


def _albumentations(cfg: AugmentConfig, image: np.ndarray, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws of the workers' pipeline on one pair: 0-255 images (n, S, S, 3), masks (n, S, S)."""
    transform = build_train_transform(cfg)
    images, masks = [], []
    for seed in range(n):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        images.append(out["image"])
        masks.append(np.asarray(out["mask"]))
    return _unnormalise(torch.stack(images), cfg), np.stack(masks)


def _device(cfg: AugmentConfig, image: np.ndarray, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws of the device path on one pair, as :func:`_albumentations` returns them."""
    batches = DeviceBatches(cfg, "cpu", seeds=lambda index: 10_000 + index)
    images = torch.from_numpy(image)[None].expand(n, -1, -1, -1).contiguous()
    masks = torch.from_numpy(mask)[None, None].expand(n, -1, -1, -1).contiguous()
    out_images, out_masks = batches.augment(images, masks, torch.arange(n))
    return _unnormalise(out_images, cfg), out_masks[:, 0].numpy()


@pytest.mark.parametrize("angle", [-25.0, 10.0, 30.0])
def test_rotation_is_albumentations_rotation(angle: float) -> None:
    image, mask = _texture()
    expected = A.Rotate(limit=(angle, angle), interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                        border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1.0)(image=image, mask=mask)
    turned, turned_mask = rotate(torch.from_numpy(image).permute(2, 0, 1)[None].float(),
                                 torch.from_numpy(mask)[None, None].float(), torch.tensor([angle]))
    difference = np.abs(turned[0].permute(1, 2, 0).numpy() - expected["image"])
    assert difference.mean() < 0.5  # OpenCV rounds its result to uint8; the same sampling otherwise
    assert (turned_mask[0, 0].numpy() == expected["mask"]).mean() > 0.999
    assert np.abs(turned[0].permute(1, 2, 0).numpy() - image).mean() > 10  # it did turn


def test_dihedral_is_numpys_quarter_turns_flips_and_transpose() -> None:
    image = np.random.default_rng(0).integers(0, 255, (6, 3, 8, 8), dtype=np.uint8)
    turns, h, v, t = np.array([0, 1, 2, 3, 1, 3]), np.array([0, 1, 0, 1, 0, 0]), np.array([1, 0, 0, 1, 1, 0]), \
        np.array([0, 0, 1, 1, 1, 1])
    out = dihedral(torch.from_numpy(image), torch.from_numpy(turns), torch.from_numpy(h).bool(), torch.from_numpy(v).bool(),
                   torch.from_numpy(t).bool()).numpy()
    for i in range(len(image)):
        expected = np.rot90(image[i], turns[i], axes=(1, 2))
        expected = expected[:, :, ::-1] if h[i] else expected
        expected = expected[:, ::-1] if v[i] else expected
        expected = expected.transpose(0, 2, 1) if t[i] else expected
        assert np.array_equal(out[i], expected), i


def _dihedral_element(mask: np.ndarray) -> tuple[int, int]:
    (place,) = np.argwhere(mask)
    return tuple(int(v) for v in place)


def test_flips_and_quarter_turns_occur_as_often_as_in_albumentations() -> None:
    cfg = AugmentConfig(**NO_ROTATION)
    image = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[0, 1] = 1  # a single pixel: where it lands names the element of the flip/turn group
    frequencies = []
    for run in (_albumentations, _device):
        _, masks = run(cfg, image, mask, SAMPLES)
        places = [_dihedral_element(m) for m in masks]
        frequencies.append({place: places.count(place) / SAMPLES for place in set(places)})
    workers, device = frequencies
    assert set(workers) == set(device) and len(device) == 8  # all eight elements, the same ones
    # the composed distribution is far from uniform (identity 5/32 ... ); a binomial sd at 2000 draws is about 0.008
    assert max(abs(workers[p] - device[p]) for p in workers) < 0.035, (workers, device)


def _bar_angle(mask: np.ndarray) -> float:
    """Orientation in degrees of a bar mask, from its second moments (0 for the bar as drawn)."""
    ys, xs = np.nonzero(mask)
    x, y = xs - xs.mean(), ys - ys.mean()
    return float(np.degrees(0.5 * np.arctan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean())))


def test_rotation_angles_follow_albumentations_histogram() -> None:
    cfg = AugmentConfig(rotate_limit=30.0, **ONLY_ROTATION)
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[30:34, 6:58] = 1  # a horizontal bar through the centre
    histograms = []
    for run in (_albumentations, _device):
        _, masks = run(cfg, image, mask, SAMPLES)
        angles = np.array([_bar_angle(m) for m in masks])
        assert np.abs(angles).max() < 32  # within the limit (the estimate is good to about a degree)
        turned = np.abs(angles) > 0.5
        histograms.append((turned.mean(), np.histogram(angles[turned], bins=np.linspace(-30, 30, 7))[0] / turned.sum()))
    (workers_turned, workers_bins), (device_turned, device_bins) = histograms
    assert abs(workers_turned - device_turned) < 0.04  # rotate_p = 0.5 of the draws turn (a few by under 0.5 degrees)
    assert np.abs(workers_bins - device_bins).max() < 0.04, (workers_bins, device_bins)
    assert np.abs(device_bins - 1 / 6).max() < 0.04  # uniform over [-30, 30]


def test_zero_fill_matches_albumentations() -> None:
    cfg = AugmentConfig()  # every transform, the study's probabilities
    image = np.full((48, 48, 3), 255, np.uint8)
    mask = np.ones((48, 48), np.uint8)
    fills = []
    for run in (_albumentations, _device):
        images, masks = run(cfg, image, mask, SAMPLES)
        filled = (images.mean(-1) < 127.5).mean(axis=(1, 2))  # per draw: the fraction of pixels the rotation filled
        mask_filled = (masks == 0).mean(axis=(1, 2))
        fills.append((filled, mask_filled))
    (workers, workers_mask), (device, device_mask) = fills
    assert workers.mean() > 0.03 and abs(workers.mean() - device.mean()) < 0.1 * workers.mean()
    assert abs((workers == 0).mean() - (device == 0).mean()) < 0.04  # unrotated draws: half of them
    assert np.abs(np.quantile(workers, [0.6, 0.8, 0.95]) - np.quantile(device, [0.6, 0.8, 0.95])).max() < 0.01
    assert abs(workers_mask.mean() - device_mask.mean()) < 0.1 * workers_mask.mean()


def test_masks_move_with_their_images_and_stay_binary() -> None:
    cfg = AugmentConfig(rotate_limit=40, rotate_p=1.0, rotate90_p=1.0, hflip_p=1.0, vflip_p=1.0, transpose_p=1.0)
    _, mask = _texture()
    image = np.repeat(mask[..., None] * 255, 3, axis=2)
    batches = DeviceBatches(cfg, "cpu", seeds=lambda index: index)
    images, masks = batches.augment(torch.from_numpy(image)[None].repeat(8, 1, 1, 1),
                                    torch.from_numpy(mask)[None, None].repeat(8, 1, 1, 1), list(range(8)))
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert masks.shape == (8, 1, 64, 64) and masks.dtype == torch.uint8
    assert set(torch.unique(masks).tolist()) <= {0, 1}
    bright = _unnormalise(images, cfg).mean(-1) > 127
    assert np.mean(bright != masks[:, 0].numpy().astype(bool)) < 0.02  # bilinear and nearest differ at edges only
    assert sum(not np.array_equal(m, mask) for m in masks[:, 0].numpy()) == 8


def test_normalise_is_the_eval_pipeline() -> None:
    image, mask = _texture(32)
    cfg = AugmentConfig()
    expected = build_eval_transform(cfg)(image=image, mask=mask)["image"]
    normalised = DeviceBatches(cfg, "cpu").normalise(torch.from_numpy(image)[None])
    assert torch.allclose(normalised[0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="seeds"):
        DeviceBatches(cfg, "cpu").augment(torch.from_numpy(image)[None], torch.from_numpy(mask)[None, None], [0])


def test_draws_follow_the_sample_seed_of_each_epoch(tmp_path) -> None:
    root = write_synthetic_dataset(tmp_path / "d", num_images=2, size=64, seed=1)
    sample = Sample("x", root / "images" / "synth0000.jpg", root / "masks" / "synth0000.png")
    dataset = SegmentationDataset([sample] * 8, 32, transform=None, seed=5)
    image, mask, _ = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (32, 32, 3) and mask.shape == (1, 32, 32)
    batches = DeviceBatches(AugmentConfig(), "cpu", seeds=dataset.sample_seed)
    images, masks = image[None].repeat(8, 1, 1, 1), mask[None].repeat(8, 1, 1, 1)

    def epoch(number: int) -> torch.Tensor:
        dataset.set_epoch(number)
        return batches.augment(images, masks, torch.arange(8))[0]

    first, again, second = epoch(1), epoch(1), epoch(2)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    draws = {tuple(row) for row in draw_parameters(AugmentConfig(), [dataset.sample_seed(i) for i in range(8)])}
    assert len(draws) >= 6  # each index its own draw (two may coincide: unturned, the same flips)
