"""The training augmentations per batch on the device, for loaders that ship uint8 (``data.augment_on: device``).

DataLoader workers then only decode (or read the disk cache) and collate uint8 image (B, S, S, 3)
and mask (B, 1, S, S) batches: a quarter of the image bytes of normalised float32 through shared
memory, pinned memory and the host-to-device copy, and no augmentation on the CPU cores, which a
many-GPU machine does not have enough of. :class:`DeviceBatches` moves each batch to the device,
rotates, flips and transposes it there, normalises it and hands it over in channels_last layout.

The transforms and their probabilities are those of :func:`kvseg.data.augment.build_train_transform`,
drawn in the same order for each sample: a rotation by an angle uniform in
``[-rotate_limit, rotate_limit]`` degrees about the image centre (probability ``rotate_p``; bilinear
for the image, nearest neighbour for the mask, zero fill for both, as ``A.Rotate`` with
``cv2.BORDER_CONSTANT``), then ``k`` quarter turns with ``k`` uniform in 0-3 (``rotate90_p``, as
``A.RandomRotate90``), then a horizontal flip, a vertical flip and a transpose, each on its own.
Each sample's draws come from :meth:`kvseg.data.dataset.SegmentationDataset.sample_seed`, the seed
the worker-side pipeline uses: reproducible for a seed, different per epoch and sample. The
rotation is PyTorch's ``affine_grid`` + ``grid_sample`` (one call for the batch); the quarter turns,
flips and transposes move pixels exactly. ``tests/test_device_augment.py`` compares the geometry
with albumentations' at fixed angles and the distribution of every transform with its pipeline's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kvseg.config import AugmentConfig

PARAMETERS = ("angle", "quarter_turns", "hflip", "vflip", "transpose")  # columns of :func:`draw_parameters`


def draw_parameters(cfg: AugmentConfig, seeds: Sequence[int]) -> np.ndarray:
    """The random transform of each sample, float64 (B, 5): :data:`PARAMETERS` (angle in degrees, 0 when not rotated).

    Each sample draws from ``numpy.random.default_rng(seed)`` in the order the worker-side
    pipeline applies its transforms; a transform not applied leaves its neutral value (0).
    """
    out = np.zeros((len(seeds), len(PARAMETERS)))
    for row, seed in zip(out, seeds):
        rng = np.random.default_rng(seed)
        u = rng.random(7)
        if u[0] < cfg.rotate_p:
            row[0] = -cfg.rotate_limit + 2 * cfg.rotate_limit * u[1]
        if u[2] < cfg.rotate90_p:
            row[1] = min(3, int(u[3] * 4))
        row[2:] = u[4:] < (cfg.hflip_p, cfg.vflip_p, cfg.transpose_p)
    return out


def rotate(images: torch.Tensor, masks: torch.Tensor, degrees: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Square float images (N, C, S, S) and masks (N, 1, S, S) turned by ``degrees`` (N,) about their centre, zero-filled.

    Positive angles turn counter-clockwise as seen on screen, as OpenCV's ``getRotationMatrix2D``
    (and so albumentations) does. The centre is that of the pixel grid, ((S - 1) / 2, (S - 1) / 2):
    with ``align_corners=False`` it is the origin of ``affine_grid``'s coordinates, and on a square
    image those coordinates are isotropic, so the matrix is the plain inverse rotation.
    """
    radians = degrees.to(device=images.device, dtype=torch.float32) * (math.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return images, masks


def _where(chosen: torch.Tensor, changed: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    return torch.where(chosen.view(-1, 1, 1, 1), changed, kept)


def dihedral(tensor: torch.Tensor, quarter_turns: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor,
             transpose: torch.Tensor) -> torch.Tensor:
    """Per sample of (N, C, S, S): ``quarter_turns`` counter-clockwise (as ``np.rot90``), then the flips and the transpose.

    The per-sample choices are (N,) tensors on ``tensor``'s device (int64 turns, bool flips).
    """
    turned = tensor
    for k in (1, 2, 3):
        turned = _where(quarter_turns == k, tensor.rot90(k, (-2, -1)), turned)
    turned = _where(hflip, turned.flip(-1), turned)
    turned = _where(vflip, turned.flip(-2), turned)
    return _where(transpose, turned.transpose(-2, -1), turned)


class DeviceBatches:
    """Turns uint8 loader batches into the model's float input on ``device``: augmented for training, normalised for both.

    ``seeds`` maps a dataset index to the seed of its augmentation in the current epoch (the
    training dataset's ``sample_seed``); ``channels_last`` sets the memory layout handed over.
    """

    def __init__(self, cfg: AugmentConfig, device: torch.device | str, seeds: Callable[[int], int] | None = None,
                 channels_last: bool = True) -> None:
        self.cfg, self.device, self.seeds = cfg, torch.device(device), seeds
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1) * 255.0

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)  # from pinned memory on a GPU: the copy overlaps compute

    def _channels_first(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) with values 0-255; a (B, 3, S, S) batch is taken as it is."""
        images = self._to_device(images)
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)  # a view whose strides are channels_last already
        return images.float()

    def _normalised(self, images: torch.Tensor) -> torch.Tensor:
        return ((images - self._mean) / self._std).contiguous(memory_format=self.memory_format)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, S, S, 3) or (B, 3, S, S) -> normalised float32 (B, 3, S, S) on the device, as the eval pipeline."""
        return self._normalised(self._channels_first(images))

    def augment(self, images: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor | Sequence[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch: uint8 images (B, S, S, 3), uint8 masks (B, 1, S, S) in {0, 1}, dataset indices (B,) on the CPU.

        Returns the normalised float32 images (B, 3, S, S) and the uint8 masks (B, 1, S, S), still
        in {0, 1}, moved together, on the device.

        Raises:
            ValueError: built without ``seeds``.
        """
        if self.seeds is None:
            raise ValueError("DeviceBatches.augment needs the dataset's seeds; built for evaluation only")
        seeds = [self.seeds(int(i)) for i in indices]
        parameters = torch.from_numpy(draw_parameters(self.cfg, seeds))
        on_device = self._to_device(parameters.float())  # small: cos, sin and the choices are formed there
        images, masks = self._channels_first(images), self._to_device(masks).float()
        angles = parameters[:, 0]
        if bool((angles != 0).any()):  # decided on the CPU copy: no wait for the device
            turned = torch.nonzero(angles != 0).flatten().to(self.device, non_blocking=True)
            rotated, rotated_masks = rotate(images[turned], masks[turned], on_device[turned, 0])
            images, masks = images.index_copy(0, turned, rotated), masks.index_copy(0, turned, rotated_masks)
        choices = (on_device[:, 1].long(), on_device[:, 2].bool(), on_device[:, 3].bool(), on_device[:, 4].bool())
        images, masks = dihedral(images, *choices), dihedral(masks, *choices)
        return self._normalised(images), masks.to(torch.uint8)
