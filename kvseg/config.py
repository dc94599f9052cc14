"""One typed configuration for a kvseg run.

The dataclasses below hold every field with its default. YAML files in ``configs/`` only override
fields, and so do ``--set section.key=value`` overrides on the command line. Unknown keys, wrong
types and bad values fail with a :class:`~kvseg.errors.ConfigError` that names the key.
Launcher settings (process count, machines, mixed precision) are not here: they belong to the
``accelerate launch`` configuration files in ``configs/accelerate/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvseg.errors import ConfigError

# The dihedral test-time transforms (kvseg.evaluation.tta implements each under this name).
TTA_TRANSFORMS = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose")


@dataclass
class DataConfig:
    """Where the dataset lives and how it is read."""

    root: str = "data/kvasir-instrument"
    class_name: str = "instrument"  # what the foreground is, as figures and the report name it (e.g. "polyp")
    image_size: int = 128  # images and masks are resized to image_size x image_size
    mask_threshold: int = 128  # binary-0-255 masks: values >= threshold are instrument
    mask_encoding: str = "auto"  # auto (decided once from all masks), binary-0-255, binary-0-1, labels or palette
    foreground_values: list[int] = field(default_factory=list)  # labels/palette: instrument values; []: any non-zero
    test_fraction: float = 0.2  # used only when the folder has no train.txt / test.txt
    val_fraction: float = 0.15  # of the training ids, drawn by split_seed, when the folder has no val.txt; 0: none
    val_min_images: int = 50  # validation gets at least this many where the training ids number 4x as many; 0: off
    split_seed: int = 0
    cache: str = "disk"  # decoded, resized pairs: "disk" (kept across runs, kvseg.data.preprocessed), "memory" (one run), "off"
    cache_dir: str = ""  # where "disk" keeps them; empty: $KVSEG_CACHE_DIR, else ~/.cache/kvseg (never the data folder)
    num_workers: int = -1  # DataLoader workers per process; -1: one less than the cores per local process (at least 1)
    augment_on: str = "auto"  # augment in the DataLoader "workers" or per batch on the "device"; auto: device on a GPU
    # The synthetic stand-in written when ``root`` does not exist and no data dir was given.
    synthetic_images: int = 240
    synthetic_test_fraction: float = 0.2
    synthetic_size: int = 192


@dataclass
class AugmentConfig:
    """The study's augmentations (random rotation, flips and transpose), and optional photometric and scale ones."""

    rotate_limit: float = 30.0  # degrees, uniform in [-limit, limit]
    rotate_p: float = 0.5
    rotate90_p: float = 0.5
    hflip_p: float = 0.5
    vflip_p: float = 0.5
    transpose_p: float = 0.5
    # Beyond the study's geometry: photometric changes and scale, each off at 0 (albumentations' own transforms)
    scale_limit: float = 0.0  # zoom in or out by up to this fraction (Affine scale 1 +- limit), with scale_p
    scale_p: float = 0.0
    brightness_contrast_p: float = 0.0  # RandomBrightnessContrast, +-0.2 each
    hue_saturation_p: float = 0.0  # HueSaturationValue: hue +-10, saturation +-20, value +-10 (of 180/255)
    blur_p: float = 0.0  # GaussianBlur, kernel 3-7 px
    jpeg_p: float = 0.0  # ImageCompression (JPEG), quality 50-95

    def workers_only(self) -> list[str]:
        """The keys of augmentations turned on that run in DataLoader workers only (not in data.augment_on=device)."""
        keys = ("scale_p", "brightness_contrast_p", "hue_saturation_p", "blur_p", "jpeg_p")
        return [f"augment.{key}" for key in keys if getattr(self, key) > 0]
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class ModelConfig:
    """Which network (``arch``, built by :mod:`kvseg.models.build`) and the fields of its family.

    ``arch`` is ``unet`` (the study's U-Net; reads base_channels, depth, upsample), ``light-s``,
    ``light-m`` or ``light-l`` (kvseg's CPU-native model, :mod:`kvseg.models.light`), or
    ``smp.<Arch>`` (an architecture of segmentation_models_pytorch; reads encoder, encoder_weights).
    """

    arch: str = "unet"
    base_channels: int = 16  # unet
    depth: int = 4  # unet: number of down-sampling steps; input sides must divide by 2**depth
    upsample: str = "transpose"  # unet: "transpose" or "bilinear"
    encoder: str = "resnet18"  # smp.*: an encoder name of segmentation_models_pytorch, e.g. mobilenet_v2, tu-...
    encoder_weights: str = ""  # smp.*: "" (random), "imagenet" (from the local cache) or a weights file


@dataclass
class TrainConfig:
    """Optimisation and evaluation schedule."""

    epochs: int = 100  # with a budget or a step limit: the most epochs (the budget usually ends training first)
    budget_minutes: float = 4.0  # training + validation minutes; the schedule runs on the fraction used; 0: off
    max_steps: int = 0  # optimizer steps (replays a budgeted run's steps on another machine); 0: epochs decide
    batch_size: int = 8  # per process
    optimizer: str = "adam"  # "adam" (the study's) or "adamw" (decoupled weight decay)
    lr: float = 3e-3
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # per optimizer step: "none", "cosine", "warmup_cosine" or "onecycle"
    warmup_epochs: float = 1.0  # linear warm-up length of "warmup_cosine"
    grad_accum_steps: int = 1
    seed: int = 42
    loss: str = "bce"  # "bce" (the study's), "dice", "bce+dice", "focal" or "tversky"
    ema_decay: float = 0.0  # exponential moving average of the weights, e.g. 0.99; 0: off
    eval_every: int = 1  # evaluate on the validation split every k epochs
    select_metric: str = "dice"  # best.pt: highest validation per-image "dice" or "iou", or lowest "loss"
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement; 0: never
    keep_every: int = 0  # also keep checkpoints/epoch_NNNN.pt every k epochs (learning curves); 0: never
    channels_last: bool = True
    compile: bool = False  # torch.compile the U-Net (a minute of compiling first; see the README for what it buys)
    cpu_threads: int = 0  # torch threads per process when training on the CPU; 0: the cores each process gets
    sync_batchnorm: str = "auto"  # "auto" (on with several GPU processes), "on" or "off"
    threshold: float = 0.5  # probability above which a pixel is predicted instrument (unless tuned)
    trackers: list[str] = field(default_factory=list)  # experiment trackers: "tensorboard", "mlflow"
    collective_timeout_s: float = 300.0  # several processes: a lost one ends the run within this (the process group's timeout)


@dataclass
class EvalConfig:
    """The final evaluation: threshold tuning on validation, test-time augmentation beside the plain test."""

    tta: list[str] = field(default_factory=lambda: list(TTA_TRANSFORMS))  # any of these dihedral transforms; [] turns TTA off
    tune_threshold: bool = False  # pick the threshold maximising validation per-image Dice over threshold_grid
    threshold_grid: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])


@dataclass
class Config:
    """Everything a run needs besides the launcher settings."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs"
    run_name: str = ""  # empty: a time stamp


_CHOICES = {
    "data.cache": ("disk", "memory", "off"),
    "data.augment_on": ("auto", "workers", "device"),
    "data.mask_encoding": ("auto", "binary-0-255", "binary-0-1", "labels", "palette"),  # kvseg.data.masks.ENCODINGS
    "model.upsample": ("transpose", "bilinear"),
    "train.optimizer": ("adam", "adamw"),
    "train.scheduler": ("none", "cosine", "warmup_cosine", "onecycle"),
    "train.sync_batchnorm": ("auto", "on", "off"),
    "train.loss": ("bce", "dice", "bce+dice", "focal", "tversky"),
    "train.select_metric": ("dice", "iou", "loss"),
}
TRACKERS = ("tensorboard", "mlflow")


def _one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf's messages span several lines; keep the first, with the full key."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return f"{message} (key '{key}')" if key and key not in message else message


def _validate(cfg: Config) -> None:
    legacy_cache = {"True": "disk", "true": "disk", "False": "off", "false": "off"}  # data.cache was a bool
    cfg.data.cache = legacy_cache.get(cfg.data.cache, cfg.data.cache)
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of {', '.join(allowed)}")
    positive = {
        "data.image_size": cfg.data.image_size,
        "data.synthetic_images": cfg.data.synthetic_images,
        "data.synthetic_size": cfg.data.synthetic_size,
        "model.base_channels": cfg.model.base_channels,
        "model.depth": cfg.model.depth,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum_steps": cfg.train.grad_accum_steps,
        "train.lr": cfg.train.lr,
        "train.eval_every": cfg.train.eval_every,
        "train.collective_timeout_s": cfg.train.collective_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' is {value}; expected a positive number")
    for key, value in {
        "data.test_fraction": cfg.data.test_fraction,
        "data.synthetic_test_fraction": cfg.data.synthetic_test_fraction,
    }.items():
        if not 0.0 < value < 1.0:
            raise ConfigError(f"config key '{key}' is {value}; expected a fraction between 0 and 1")
    for key, value in {"data.val_fraction": cfg.data.val_fraction, "train.ema_decay": cfg.train.ema_decay}.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"config key '{key}' is {value}; expected 0 (off) or a fraction below 1")
    for key, value in {"train.warmup_epochs": cfg.train.warmup_epochs,
                       "train.early_stopping_patience": cfg.train.early_stopping_patience,
                       "data.val_min_images": cfg.data.val_min_images,
                       "train.budget_minutes": cfg.train.budget_minutes, "train.max_steps": cfg.train.max_steps,
                       "train.keep_every": cfg.train.keep_every}.items():
        if not value >= 0 or value == float("inf"):  # also refuses NaN
            raise ConfigError(f"config key '{key}' is {value}; expected 0 or more")
    if not 0.0 < cfg.train.threshold < 1.0 or not all(0.0 < t < 1.0 for t in cfg.eval.threshold_grid):
        raise ConfigError("config keys 'train.threshold' and 'eval.threshold_grid' need probabilities between 0 and 1")
    unknown = [t for t in cfg.train.trackers if t not in TRACKERS]
    if unknown:
        raise ConfigError(f"config key 'train.trackers' has {', '.join(unknown)}; expected some of {', '.join(TRACKERS)}")
    if not 1 <= cfg.data.mask_threshold <= 255:
        raise ConfigError(f"config key 'data.mask_threshold' is {cfg.data.mask_threshold}; expected 1 to 255")
    values = cfg.data.foreground_values
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"config key 'data.foreground_values' is {values}; expected distinct non-negative mask values")
    if values and cfg.data.mask_encoding.startswith("binary"):
        raise ConfigError(f"config key 'data.foreground_values' is {values}, but data.mask_encoding is "
                          f"{cfg.data.mask_encoding}; expected labels, palette or auto with foreground values")
    unknown = [name for name in cfg.eval.tta if name not in TTA_TRANSFORMS]
    if unknown:
        raise ConfigError(f"config key 'eval.tta' has {', '.join(unknown)}; expected some of {', '.join(TTA_TRANSFORMS)}")
    if not cfg.data.class_name.strip():
        raise ConfigError("config key 'data.class_name' is empty; expected the foreground's name, e.g. instrument or polyp")
    if cfg.data.augment_on == "device" and cfg.augment.workers_only():
        raise ConfigError(f"config keys {', '.join(cfg.augment.workers_only())} augment in the DataLoader workers only; "
                          "expected data.augment_on workers or auto with them")
    for name, value in vars(cfg.augment).items():
        if name.endswith("_p") and not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key 'augment.{name}' is {value}; expected a probability from 0 to 1")
    if not 0.0 <= cfg.augment.scale_limit < 1.0:
        raise ConfigError(f"config key 'augment.scale_limit' is {cfg.augment.scale_limit}; expected 0 to below 1")
    if len(cfg.augment.mean) != 3 or len(cfg.augment.std) != 3:
        raise ConfigError("config keys 'augment.mean' and 'augment.std' need three values (R, G, B)")
    if min(cfg.augment.std) <= 0:
        raise ConfigError(f"config key 'augment.std' is {cfg.augment.std}; expected positive values")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the run configuration: defaults, then the YAML file at ``path``, then ``overrides``.

    ``overrides`` are ``section.key=value`` strings, e.g. ``train.lr=1e-3``. What only the model knows
    (a known ``model.arch`` and encoder, an image size it takes) is checked by
    :func:`kvseg.models.build.check_model_config` when a run starts.
    """
    merged = OmegaConf.structured(Config)
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"{path}: config file not found")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path}: expected a YAML mapping of config sections")
            merged = OmegaConf.merge(merged, loaded)
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=1e-3")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{_one_line(exc)}") from None
    assert isinstance(cfg, Config)
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of ``cfg``, for JSON, YAML and checkpoints."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :func:`config_to_dict` output (e.g. stored in a checkpoint)."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), values))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"stored config: {_one_line(exc)}") from None
    assert isinstance(cfg, Config)
    return cfg


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, as printed at start and saved in the run folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
