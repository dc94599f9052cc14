"""Test-time augmentation over the dihedral group: flips, transposes and 90-degree rotations.

Each transform acts on the last two axes of a (B, C, H, W) tensor and has an exact inverse, so a
prediction made on a transformed image maps back to the original place pixel for pixel.
:func:`tta_logits` averages the probabilities of the chosen transforms and returns logits again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvseg.config import TTA_TRANSFORMS

Transform = Callable[[torch.Tensor], torch.Tensor]

# name: (forward, inverse)
DIHEDRAL: dict[str, tuple[Transform, Transform]] = {
    "identity": (lambda x: x, lambda x: x),
    "hflip": (lambda x: x.flip(-1), lambda x: x.flip(-1)),
    "vflip": (lambda x: x.flip(-2), lambda x: x.flip(-2)),
    "rot90": (lambda x: x.rot90(1, (-2, -1)), lambda x: x.rot90(-1, (-2, -1))),
    "rot180": (lambda x: x.rot90(2, (-2, -1)), lambda x: x.rot90(-2, (-2, -1))),
    "rot270": (lambda x: x.rot90(-1, (-2, -1)), lambda x: x.rot90(1, (-2, -1))),
    "transpose": (lambda x: x.transpose(-2, -1), lambda x: x.transpose(-2, -1)),
    "antitranspose": (lambda x: x.rot90(2, (-2, -1)).transpose(-2, -1), lambda x: x.transpose(-2, -1).rot90(-2, (-2, -1))),
}
ALL_TRANSFORMS = tuple(DIHEDRAL)
assert ALL_TRANSFORMS == TTA_TRANSFORMS, "kvseg.config.TTA_TRANSFORMS names these transforms"
_EPSILON = 1e-7


def check_transforms(names: Sequence[str]) -> None:
    """Raise ValueError for an unknown transform name."""
    unknown = [n for n in names if n not in DIHEDRAL]
    if unknown:
        raise ValueError(f"unknown TTA transform(s) {', '.join(unknown)}; expected some of {', '.join(ALL_TRANSFORMS)}")


def tta_logits(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """Logits of the mean probability of ``predict`` over the transforms ``names``, mapped back.

    ``predict`` maps images (B, 3, H, W) to logits (B, 1, H, W); H and W may be swapped by a
    transform, so both must be valid input sizes.
    """
    check_transforms(names)
    total = None
    for name in names:
        forward, inverse = DIHEDRAL[name]
        probabilities = torch.sigmoid(inverse(predict(forward(images)).float()))
        total = probabilities if total is None else total + probabilities
    mean = (total / len(names)).clamp(_EPSILON, 1 - _EPSILON)
    return torch.logit(mean)


def with_tta(logits_fn: Callable[[torch.Tensor], torch.Tensor], names: Sequence[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A logits function that averages ``logits_fn`` over the transforms ``names`` (see :func:`tta_logits`)."""
    check_transforms(names)
    return lambda images: tta_logits(logits_fn, images, names)
