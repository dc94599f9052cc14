"""albumentations pipelines: the study's training augmentations and the deterministic eval pipeline.

Both take ``image`` (uint8 RGB, H x W x 3) and ``mask`` (uint8 {0, 1}, H x W) together and return a
normalised float tensor (3, H, W) and the mask, still in {0, 1}: geometric transforms use
nearest-neighbour interpolation and a zero fill for the mask.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from kvseg.config import AugmentConfig


class SeededCompose(A.Compose):
    """``A.Compose`` whose transforms draw from independent random streams after ``set_random_seed``.

    ``A.Compose.set_random_seed`` (albumentations 2.0) hands every transform the same seed, so
    their first draws coincide: with equal probabilities, all flips happen together or none does,
    and only two of the eight flip/transpose combinations are ever seen.
    """

    def set_random_seed(self, seed: int | None) -> None:
        super().set_random_seed(seed)
        if seed is None:
            return
        streams = np.random.SeedSequence(seed).generate_state(len(self.transforms))
        for transform, stream in zip(self.transforms, streams):
            transform.set_random_seed(int(stream))


def _finish(cfg: AugmentConfig) -> list[A.BasicTransform]:
    return [A.Normalize(mean=cfg.mean, std=cfg.std, max_pixel_value=255.0), ToTensorV2()]


def _beyond_the_study(cfg: AugmentConfig) -> list[A.BasicTransform]:
    """Scale and photometric transforms, each present only when its probability is above 0 (the study's pipeline
    is unchanged by default). Limits are albumentations' usual ones, named in :class:`kvseg.config.AugmentConfig`."""
    transforms = []
    if cfg.scale_p > 0 and cfg.scale_limit > 0:
        transforms.append(A.Affine(scale=(1 - cfg.scale_limit, 1 + cfg.scale_limit), interpolation=cv2.INTER_LINEAR,
                                   mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT, fill=0,
                                   fill_mask=0, p=cfg.scale_p))
    if cfg.brightness_contrast_p > 0:
        transforms.append(A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=cfg.brightness_contrast_p))
    if cfg.hue_saturation_p > 0:
        transforms.append(A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10,
                                               p=cfg.hue_saturation_p))
    if cfg.blur_p > 0:
        transforms.append(A.GaussianBlur(blur_limit=(3, 7), p=cfg.blur_p))
    if cfg.jpeg_p > 0:
        transforms.append(A.ImageCompression(quality_range=(50, 95), p=cfg.jpeg_p))
    return transforms


def build_train_transform(cfg: AugmentConfig) -> A.Compose:
    """Random rotation (plus 90-degree turns), horizontal/vertical flip and transpose, then normalise.

    The pipeline's randomness is its own: :class:`kvseg.data.folder.SegmentationDataset` reseeds it per
    sample through ``set_random_seed``; each transform then decides independently.
    """
    return SeededCompose(
        [
            A.Rotate(
                limit=cfg.rotate_limit,
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=cfg.rotate_p,
            ),
            A.RandomRotate90(p=cfg.rotate90_p),
            A.HorizontalFlip(p=cfg.hflip_p),
            A.VerticalFlip(p=cfg.vflip_p),
            A.Transpose(p=cfg.transpose_p),
            *_beyond_the_study(cfg),
            *_finish(cfg),
        ]
    )


def build_eval_transform(cfg: AugmentConfig) -> A.Compose:
    """Normalisation and tensor conversion only: no random operation."""
    return A.Compose(_finish(cfg))
