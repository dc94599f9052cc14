"""Architectures and encoders of segmentation_models_pytorch (smp), as kvseg models.

``model.arch=smp.<Arch>`` (``smp.Unet``, ``smp.UnetPlusPlus``, ``smp.FPN``, ``smp.DeepLabV3Plus``,
``smp.Linknet``, ...) with ``model.encoder`` (``resnet18``, ``mobilenet_v2``, ``efficientnet-b0``,
``mit_b0``, ``tu-<timm name>``, ...) builds ``smp.<Arch>(encoder_name=..., classes=1)`` inside
:class:`LibraryModel`, which returns logits (B, 1, H, W) like every kvseg model.

smp is an optional extra (``pip install -e ".[smp]"``): it pulls timm and torchvision, and on a
CPU-only machine without PyTorch's CPU index that means a CUDA build of torch of several GB;
kvseg's own models need none of it. This module imports smp only when such a model is asked for.

``model.encoder_weights`` never reaches the network: ``""`` starts the encoder from random weights
(said in one line), ``"imagenet"`` reads smp's ImageNet weights (``smp-hub/<encoder>.imagenet``;
timm's for ``tu-`` encoders) from the local Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``), and
any other value is a weights file (``.safetensors``, or a ``torch.save`` state dict of the encoder).
With ImageNet weights the encoder's own normalisation (the mean and std in its ``config.json``, smp's
preprocessing parameters) replaces kvseg's defaults in ``augment.mean`` / ``augment.std``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from kvseg.config import AugmentConfig, Config, ModelConfig
from kvseg.errors import ConfigError

logger = logging.getLogger(__name__)

PREFIX = "smp."
ENCODER_DEPTH = 5  # smp's default: five stride-2 stages, so input sides divide by 2**5
INPUT_MULTIPLE = 2**ENCODER_DEPTH
MIN_IMAGE_SIZE = 2 * INPUT_MULTIPLE  # 2x2 at the deepest stage, where BatchNorm still trains on one image
INSTALL = 'pip install -e ".[smp]"'


def smp_available() -> bool:
    """True when segmentation_models_pytorch can be imported here."""
    return importlib.util.find_spec("segmentation_models_pytorch") is not None


def _smp(arch: str) -> ModuleType:
    if not smp_available():
        raise ConfigError(f"config key 'model.arch' is {arch}, which needs segmentation_models_pytorch ({INSTALL})")
    import segmentation_models_pytorch

    return segmentation_models_pytorch


def architectures() -> list[str]:
    """The ``smp.<Arch>`` values this smp offers, e.g. ``smp.Unet`` (empty without smp)."""
    if not smp_available():
        return []
    from segmentation_models_pytorch import MODEL_ARCHITECTURES_MAPPING

    return [PREFIX + cls.__name__ for cls in MODEL_ARCHITECTURES_MAPPING.values()]


def architecture_class(arch: str) -> type:
    """The smp class ``smp.<Arch>`` names.

    Raises:
        ConfigError: smp is not installed, or it has no such architecture.
    """
    smp = _smp(arch)
    name = arch.removeprefix(PREFIX)
    classes = {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}
    if name not in classes:
        raise ConfigError(f"config key 'model.arch' is {arch!r}; segmentation_models_pytorch {smp.__version__} has "
                          f"{', '.join(PREFIX + n for n in classes)}")
    return classes[name]


def check_encoder(cfg: ModelConfig) -> None:
    """Raise ConfigError naming ``model.encoder`` when smp (or timm, for ``tu-``) has no such encoder."""
    smp = _smp(cfg.arch)
    if cfg.encoder.startswith("tu-"):
        import timm

        if not timm.is_model(cfg.encoder.removeprefix("tu-")):
            raise ConfigError(f"config key 'model.encoder' is {cfg.encoder!r}; timm has no model "
                              f"{cfg.encoder.removeprefix('tu-')!r} (timm.list_models() lists them)")
    elif cfg.encoder not in smp.encoders.get_encoder_names():
        raise ConfigError(f"config key 'model.encoder' is {cfg.encoder!r}; expected an encoder of "
                          f"segmentation_models_pytorch (e.g. resnet18, mobilenet_v2, efficientnet-b0, mit_b0, "
                          "tu-<timm name>; smp.encoders.get_encoder_names() lists them)")


class LibraryModel(nn.Module):
    """An smp network with one output class: images (B, 3, H, W) float32 -> logits (B, 1, H, W).

    Input sides must be multiples of the encoder's output stride (32).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.input_multiple = int(network.encoder.output_stride)

    def stages(self) -> dict[str, nn.Module]:
        """The named layers whose outputs the report shows: the encoder (a list of features, one per stride)
        and the decoder."""
        return {"encoder": self.network.encoder, "decoder": self.network.decoder}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)  # smp checks the input size in eager mode itself


def build_library_model(cfg: ModelConfig, pretrained: bool = False) -> LibraryModel:
    """``smp.<Arch>`` with ``cfg.encoder``; with ``pretrained``, the encoder starts from ``cfg.encoder_weights``.

    Raises:
        ConfigError: smp is not installed, or the arch, encoder or weights are unknown or missing.
    """
    architecture = architecture_class(cfg.arch)
    check_encoder(cfg)
    weights = pretrained and cfg.encoder_weights
    extra: dict = {}
    if weights and cfg.encoder.startswith("tu-"):  # timm builds and loads its own weights, from our file
        extra = {"encoder_weights": True, "pretrained_cfg_overlay": {"file": str(weights_file(cfg))}}
    network = architecture(encoder_name=cfg.encoder, encoder_depth=ENCODER_DEPTH, in_channels=3, classes=1,
                           **({"encoder_weights": None} | extra))
    if weights and not cfg.encoder.startswith("tu-"):
        load_encoder_weights(network.encoder, weights_file(cfg), cfg)
    if pretrained:
        source = {"": "random weights", "imagenet": "ImageNet weights (local cache)"}.get(cfg.encoder_weights,
                                                                                        f"weights {cfg.encoder_weights}")
        logger.info(f"model {cfg.arch} with encoder {cfg.encoder}: the encoder starts from {source}"
                    + (" (set model.encoder_weights to imagenet or a file to start from trained ones)"
                       if not cfg.encoder_weights else ""))
    return LibraryModel(network)


def _hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """A file of a Hugging Face repo from the local cache only (no network); None when it is not there."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def _imagenet_repo(cfg: ModelConfig) -> tuple[str, str | None, str]:
    """(repo id, revision, file name) of the encoder's ImageNet weights on the Hugging Face hub."""
    if cfg.encoder.startswith("tu-"):
        import timm

        pretrained = timm.models.get_pretrained_cfg(cfg.encoder.removeprefix("tu-"))
        if pretrained is None or not pretrained.hf_hub_id:
            raise ConfigError(f"config key 'model.encoder_weights' is imagenet, but timm names no pretrained weights "
                              f"for {cfg.encoder}; give a weights file or leave it empty")
        return pretrained.hf_hub_id, None, "model.safetensors"
    settings = _smp(cfg.arch).encoders.encoders[cfg.encoder]["pretrained_settings"]
    if "imagenet" not in settings:
        raise ConfigError(f"config key 'model.encoder_weights' is imagenet, but {cfg.encoder} has only "
                          f"{', '.join(settings) or 'no'} weights in smp; give a weights file or leave it empty")
    return settings["imagenet"]["repo_id"], settings["imagenet"].get("revision"), "model.safetensors"


def weights_file(cfg: ModelConfig) -> Path:
    """The file ``cfg.encoder_weights`` names: a path, or for ``imagenet`` the cached hub file.

    Raises:
        ConfigError: the file does not exist, or the ImageNet weights are not in the local cache.
    """
    if cfg.encoder_weights == "imagenet":
        repo, revision, filename = _imagenet_repo(cfg)
        path = _hub_file(repo, filename, revision)
        if path is None:
            raise ConfigError(f"config key 'model.encoder_weights' is imagenet, but {repo}/{filename} is not in the "
                              "local Hugging Face cache (HF_HOME / HF_HUB_CACHE; nothing is downloaded here); give "
                              "the file's path, or leave model.encoder_weights empty for random weights")
        return path
    path = Path(cfg.encoder_weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key 'model.encoder_weights': {path}: file not found; expected imagenet, a "
                          "weights file of the encoder (.safetensors or .pt), or empty for random weights")
    return path


def load_encoder_weights(encoder: nn.Module, path: Path, cfg: ModelConfig) -> None:
    """Load a state dict from ``path`` into ``encoder`` (smp drops a classifier's ``fc`` keys itself).

    Raises:
        ConfigError: the file cannot be read, or its tensors do not fit the encoder.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise many types for a damaged file
        raise ConfigError(f"config key 'model.encoder_weights': {path}: cannot read weights "
                          f"({type(exc).__name__}); expected .safetensors or a torch.save state dict") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        encoder.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ConfigError(f"config key 'model.encoder_weights': {path} does not fit the {cfg.encoder} encoder "
                          f"({str(exc).splitlines()[0][:200]})") from None


def encoder_normalization(cfg: ModelConfig) -> tuple[list[float], list[float]] | None:
    """The (mean, std) the encoder's weights were trained with (RGB, for pixels in [0, 1]), or None when unknown.

    Read from the ``config.json`` beside ImageNet weights in the local cache (smp's preprocessing
    parameters), from timm's pretrained config for ``tu-`` encoders, or from a ``config.json`` beside
    a weights file. Random weights have no normalisation of their own (None).

    Raises:
        ConfigError: the weights expect BGR input or a [0, 255] range, which kvseg's pipeline does not make.
    """
    if not cfg.encoder_weights:
        return None
    if cfg.encoder.startswith("tu-"):
        import timm

        settings = (timm.models.get_pretrained_cfg(cfg.encoder.removeprefix("tu-")) or {}).__dict__ if (
            cfg.encoder_weights == "imagenet") else {}
    else:
        config = weights_file(cfg).with_name("config.json")
        settings = json.loads(config.read_text()) if config.is_file() else {}
    if "mean" not in settings or "std" not in settings:
        return None
    if settings.get("input_space", "RGB") != "RGB" or list(settings.get("input_range", [0, 1])) != [0, 1]:
        raise ConfigError(f"config key 'model.encoder': {cfg.encoder}'s weights expect {settings.get('input_space')} "
                          f"input in {settings.get('input_range')}; kvseg feeds RGB in [0, 1]")
    return [float(v) for v in settings["mean"]], [float(v) for v in settings["std"]]


def follow_encoder_normalization(cfg: Config) -> None:
    """Set ``augment.mean`` / ``augment.std`` to the encoder's normalisation when they are kvseg's defaults.

    Values set by the user are kept, with a warning when the encoder's weights expect others.
    """
    found = encoder_normalization(cfg.model)
    if found is None or (cfg.augment.mean, cfg.augment.std) == found:
        return
    default = AugmentConfig()
    if (cfg.augment.mean, cfg.augment.std) == (default.mean, default.std):
        cfg.augment.mean, cfg.augment.std = found
        logger.info(f"normalisation of the {cfg.model.encoder} encoder's weights: mean {found[0]}, std {found[1]}")
    else:
        logger.warning(f"augment.mean / augment.std are set to {cfg.augment.mean} / {cfg.augment.std}; the "
                       f"{cfg.model.encoder} encoder's weights were trained with {found[0]} / {found[1]}")
