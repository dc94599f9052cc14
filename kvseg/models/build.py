"""The model registry: ``model.arch`` -> the network, the input-size multiple it needs, the smallest size it trains at.

Three families, each a module of this package:

=================  ===============================  ==============  ===================
``model.arch``     module                           input multiple  smallest image side
=================  ===============================  ==============  ===================
``unet``           :mod:`kvseg.models.unet`         ``2**depth``    ``2**(depth + 1)``
``light-s/m/l``    :mod:`kvseg.models.light`        16              32
``smp.<Arch>``     :mod:`kvseg.models.library`      32              64
=================  ===============================  ==============  ===================

Every model maps normalised images (B, 3, H, W) float32 to logits (B, 1, H, W), has an
``input_multiple`` attribute (export's dynamic axes and verification sizes read it) and a
``stages()`` method naming the layers the report shows as feature maps.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from kvseg.config import Config, ModelConfig
from kvseg.errors import ConfigError
from kvseg.models import library, light, unet


class SegmentationModel(Protocol):
    """What every kvseg model offers besides ``forward``."""

    input_multiple: int

    def stages(self) -> dict[str, nn.Module]: ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def family_of(arch: str) -> str:
    """``unet``, ``light`` or ``smp`` for a ``model.arch`` value.

    Raises:
        ConfigError: the value names no family.
    """
    if arch == "unet":
        return "unet"
    if arch in light.SIZES:
        return "light"
    if arch.startswith(library.PREFIX) and len(arch) > len(library.PREFIX):
        return "smp"
    raise ConfigError(f"config key 'model.arch' is {arch!r}; expected unet, {', '.join(light.SIZES)} or "
                      "smp.<Arch> (e.g. smp.Unet, smp.UnetPlusPlus, smp.FPN, smp.DeepLabV3Plus)")


def build_model(cfg: ModelConfig, pretrained: bool = False) -> nn.Module:
    """The network ``cfg`` describes, in train mode with fresh weights.

    ``pretrained`` (training only) starts an smp encoder from ``model.encoder_weights``; a checkpoint
    is loaded over a model built without it.

    Raises:
        ConfigError: an unknown arch or encoder, smp missing for ``smp.*``, a missing weights file.
    """
    family = family_of(cfg.arch)
    if family == "unet":
        return unet.build_model(cfg)
    if family == "light":
        return light.LightSeg(light.SIZES[cfg.arch])
    return library.build_library_model(cfg, pretrained)


def input_multiple(cfg: ModelConfig) -> int:
    """What input height and width must be a multiple of for ``cfg``'s model."""
    family = family_of(cfg.arch)
    return {"unet": 2**cfg.depth, "light": light.INPUT_MULTIPLE, "smp": library.INPUT_MULTIPLE}[family]


def min_image_size(cfg: ModelConfig) -> int:
    """The smallest image side ``cfg``'s model trains at: 2x2 pixels at its deepest stage (BatchNorm needs more
    than one value per channel on a batch of one image)."""
    family = family_of(cfg.arch)
    return {"unet": 2 ** (cfg.depth + 1), "light": light.MIN_IMAGE_SIZE, "smp": library.MIN_IMAGE_SIZE}[family]


def check_model_config(cfg: Config) -> None:
    """What only the model knows: a known arch (and encoder, and weights file), an image size it takes.

    For an smp encoder with trained weights, ``augment.mean`` / ``augment.std`` follow the weights'
    normalisation when they are kvseg's defaults (:func:`kvseg.models.library.follow_encoder_normalization`),
    so the run's config, every checkpoint and the ONNX metadata carry it.

    Raises:
        ConfigError: naming the key at fault (``model.arch``, ``model.encoder``, ``model.encoder_weights``,
            ``data.image_size``).
    """
    family = family_of(cfg.model.arch)
    if family == "smp":
        library.architecture_class(cfg.model.arch)
        library.check_encoder(cfg.model)
        if cfg.model.encoder_weights:
            library.weights_file(cfg.model)
            library.follow_encoder_normalization(cfg)
    size, multiple, smallest = cfg.data.image_size, input_multiple(cfg.model), min_image_size(cfg.model)
    if size % multiple:
        raise ConfigError(f"config key 'data.image_size' is {size}; model {describe(cfg.model)} needs a multiple of "
                          f"{multiple}")
    if size < smallest:
        raise ConfigError(
            f"config key 'data.image_size' is {size}; model {describe(cfg.model)} would leave "
            f"{size // (smallest // 2)}x{size // (smallest // 2)} px at its deepest stage, where BatchNorm cannot "
            f"train on a batch of one image; expected at least {smallest}"
            + (" (2x2 px at the bottleneck), or a smaller model.depth" if family == "unet" else ""))


def describe(cfg: ModelConfig) -> str:
    """The model in a few words, for logs, the report and the benchmark, e.g. ``light-m`` or
    ``smp.Unet (resnet18, random weights)``."""
    family = family_of(cfg.arch)
    if family == "unet":
        return f"U-Net base {cfg.base_channels}, depth {cfg.depth}, {cfg.upsample} upsampling"
    if family == "light":
        return cfg.arch
    weights = {"": "random weights", "imagenet": "ImageNet weights"}.get(cfg.encoder_weights, "weights from a file")
    return f"{cfg.arch} ({cfg.encoder}, {weights})"


def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters of ``model`` (BatchNorm's running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())
