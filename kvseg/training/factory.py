"""Set-up of a training run: the accelerator, the run folder, and everything the epoch loop works with.

:func:`start_run` opens a new or resumed run folder; :func:`build_training` builds the model,
optimizer, schedule, weight average, loss and loaders from the config, each by its own factory,
and prepares them with ``accelerate``; :mod:`kvseg.training.run` runs the loop over what they return.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from kvseg.config import Config, config_to_dict, config_to_yaml
from kvseg.data.dataset import SegmentationDataset, build_dataloaders, build_datasets
from kvseg.data.device_augment import DeviceBatches
from kvseg.data.folder import find_samples
from kvseg.data.prepare import prepare_training_data
from kvseg.data.preprocessed import resolve_cache_dir
from kvseg.data.splits import Split, resolve_split
from kvseg.data.synthetic import resolve_data_root
from kvseg.errors import CheckpointError, ConfigError
from kvseg.evaluation.evaluate import LogitsFn, torch_logits
from kvseg.models.build import build_model, check_model_config
from kvseg.models.losses import build_loss
from kvseg.runs.folder import Progress, RunDir, create_run, open_run
from kvseg.runtime import (
    configure_gpu_math,
    cpu_threads_per_process,
    describe_machine,
    gpu_math,
    no_accelerator,
    resolve_augment_on,
    resolve_mixed_precision,
)
from kvseg.training.optim import ProgressSchedule, build_ema, build_optimizer, build_scheduler
from kvseg.training.resume import describe, resume_config

logger = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """What the command line decides beyond the config."""

    data_dir_given: bool = False  # an explicit data dir must exist: no fall-back to synthetic data
    resume: str | None = None
    mixed_precision: str = "auto"  # "auto", "no", "fp16" or "bf16"
    plan: str | None = None  # the plan's YAML (with its reasons) when --plan auto made the config


@dataclass
class Training:
    """What the epoch loop works with: model, optimizer and loaders prepared by ``accelerate``."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: ProgressSchedule
    ema: AveragedModel | None
    loss_fn: torch.nn.Module
    datasets: dict[str, SegmentationDataset]
    loaders: dict[str, DataLoader]
    logits: LogitsFn  # what is evaluated: the averaged weights when ``ema`` is on, else the model
    weights: torch.nn.Module  # what is checkpointed: the same, unwrapped
    # data.augment_on device: (images, masks, indices) of uint8 -> the augmented, normalised batch on the device
    augment: Callable | None = None
    normalise: Callable | None = None  # ... and uint8 images -> normalised ones, for evaluation; None: loaders normalise


def build_training(cfg: Config, split: Split, accelerator: Accelerator) -> Training:
    """Model, optimizer, per-step schedule, weight average, loss and a loader per split, prepared and registered.

    The schedule and the weight average are registered for ``save_state`` so that a resume restores them.
    With ``data.augment_on`` resolving to ``device`` the loaders ship uint8 pairs and stay on the
    host (no device placement: each batch's indices are read there), and ``augment`` / ``normalise``
    move and turn them into the model's input. The disk cache was built by :func:`start_run`'s
    preparation; only one process per machine may build it.
    """
    model = prepare_model(cfg, accelerator)
    optimizer = build_optimizer(model, cfg.train)
    on_device = resolve_augment_on(cfg.data.augment_on, accelerator.device, bool(cfg.augment.workers_only())) == "device"
    datasets = build_datasets(cfg, find_samples(cfg.data.root), dict(split.items()), uint8=on_device,
                              build_cache=accelerator.is_local_main_process)
    loaders = build_dataloaders(cfg, datasets, pin_memory=accelerator.device.type == "cuda")
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values(),
                                                      device_placement=[True, True] + [not on_device] * len(loaders))
    loaders = dict(zip(loaders, prepared))
    scheduler = build_scheduler(optimizer, cfg.train, math.ceil(len(loaders["train"]) / cfg.train.grad_accum_steps))
    plain = accelerator.unwrap_model(model, keep_torch_compile=False)  # the model itself: what is averaged and saved
    ema = build_ema(plain, cfg.train)
    for stateful in (scheduler, ema):
        if stateful is not None:
            accelerator.register_for_checkpointing(stateful)
    weights = ema.module if ema is not None else plain
    batches = DeviceBatches(cfg.augment, accelerator.device, datasets["train"].sample_seed,
                            cfg.train.channels_last) if on_device else None
    return Training(model, optimizer, scheduler, ema, build_loss(cfg.train), datasets, loaders,
                    scoring_fn(model, ema, cfg, accelerator), weights,
                    batches.augment if batches else None, batches.normalise if batches else None)


def build_accelerator(cfg: Config, mixed_precision: str = "auto") -> Accelerator:
    """The accelerator of a run: kvseg's precision and device policy (:mod:`kvseg.runtime`), seeded sampling, trackers.

    Raises:
        ConfigError: a tracker in ``train.trackers`` is not installed.
    """
    for tracker in cfg.train.trackers:
        if importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"config key 'train.trackers': {tracker} is not installed (pip install 'kvseg[{tracker}]')")
    cpu, precision = no_accelerator(), resolve_mixed_precision(mixed_precision)
    if cpu and precision == "fp16":  # accelerate would train in fp32 without a word
        raise ConfigError("mixed precision fp16 needs a GPU; on the CPU use bf16 (fast where the CPU has native bf16) "
                          "or no")
    if cpu and cfg.train.sync_batchnorm == "on":
        raise ConfigError("config key 'train.sync_batchnorm' is on, but SyncBatchNorm runs on GPUs only; use auto or off")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        kwargs_handlers=[process_group_timeout(cfg.train.collective_timeout_s)],
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        # pinned host memory (set by build_dataloaders on a GPU) copies to the device without blocking
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed, non_blocking=not cpu),
        log_with=list(cfg.train.trackers) or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=cfg.output_dir),
    )
    configure_gpu_math(accelerator.device)  # cudnn.benchmark and TF32 on a GPU
    return accelerator


def process_group_timeout(seconds: float) -> InitProcessGroupKwargs:
    """The process group's timeout, ``train.collective_timeout_s``: how long a collective waits for a peer.

    gloo raises "Timed out waiting ... for recv operation to complete" after it; NCCL's watchdog aborts
    the group. The backends' default (30 minutes; accelerate's 10 for NCCL) would hold every GPU that
    long after one machine is lost. It must exceed the longest time one process works while the others
    wait in a collective: the first step under ``train.compile``, a slow checkpoint write. (The folder
    check and the disk cache are prepared while the others wait on a file, not in a collective.)
    """
    handler = InitProcessGroupKwargs(timeout=timedelta(seconds=seconds))
    if "timeout" not in handler.to_kwargs():  # accelerate passes on only values unlike its default (600 s)
        handler.timeout += timedelta(microseconds=1)
    return handler


def environment(accelerator: Accelerator, cfg: Config | None = None) -> dict:
    """The machine (:func:`kvseg.runtime.describe_machine`) and how this run uses it: processes, precision,
    cuDNN autotuning and TF32 (:func:`kvseg.runtime.gpu_math`), and where training augments."""
    used = {"device": str(accelerator.device), "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "mixed_precision": accelerator.mixed_precision,
            **gpu_math()}
    if cfg is not None:
        used["augment_on"] = resolve_augment_on(cfg.data.augment_on, accelerator.device, bool(cfg.augment.workers_only()))
    return {**describe_machine(), **used}


def start_trackers(accelerator: Accelerator, cfg: Config, run: RunDir) -> None:
    """Experiment trackers (``train.trackers``) writing into ``RUN/logs``, with the config as hyper-parameters."""
    if not cfg.train.trackers:
        return
    accelerator.project_configuration.logging_dir = str(run.logs)
    flat = {f"{section}.{key}": value if isinstance(value, int | float | str | bool) else str(value)
            for section, values in config_to_dict(cfg).items() if isinstance(values, dict)
            for key, value in values.items()}
    accelerator.init_trackers("kvseg", config=flat,
                              init_kwargs={"mlflow": {"logging_dir": str(run.logs / "mlruns"), "run_name": run.path.name}})


def prepare_model(cfg: Config, accelerator: Accelerator, pretrained: bool = True) -> torch.nn.Module:
    """The model of ``cfg`` (``model.arch``), with SyncBatchNorm under multi-GPU DDP (``train.sync_batchnorm``),
    channels_last, and compiled by ``torch.compile`` when ``train.compile`` is on.

    ``pretrained``: an smp encoder starts from ``model.encoder_weights`` (off for speed measurements)."""
    model: torch.nn.Module = build_model(cfg.model, pretrained=pretrained)
    sync = cfg.train.sync_batchnorm
    if sync == "on" or (sync == "auto" and accelerator.num_processes > 1 and accelerator.device.type == "cuda"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.train.compile else model


def scoring_fn(model: torch.nn.Module, ema: AveragedModel | None, cfg: Config, accelerator: Accelerator) -> LogitsFn:
    """The logits function that is evaluated and checkpointed: the EMA weights when on, else the model."""
    if ema is None:
        return torch_logits(model, cfg.train.channels_last)
    averaged = torch_logits(ema.module, cfg.train.channels_last)

    def logits(images: torch.Tensor) -> torch.Tensor:
        with accelerator.autocast():  # the averaged copy is not prepared: give it the run's precision
            return averaged(images)

    return logits


def start_run(cfg: Config, options: RunOptions, accelerator: Accelerator) -> tuple[RunDir, Split, Progress, Path | None]:
    """A new run folder, or the one to resume, locked for this run: its split, progress and the state to load.

    A new run resolves the data folder first (writing the synthetic stand-in when needed), records
    it in ``cfg.data.root`` and writes the config, split and environment. The state folder is None
    for a new run. The model's own checks (:func:`kvseg.models.build.check_model_config`) come first. A
    resumed run checks what ``cfg`` changes (:func:`kvseg.training.resume.resume_config`) and records the
    changes in its config.yaml.
    """
    check_model_config(cfg)
    changes: dict = {}
    if options.resume:
        run = open_run(options.resume)
        state, progress = run.load_progress()
        changes = resume_config(run, cfg, progress)
        prepare_training_data(cfg, accelerator.is_local_main_process)
        split = run.split(cfg)
    else:
        cfg.data.root = str(resolve_data_root(cfg.data, options.data_dir_given, accelerator))
        resolve_cache_dir(cfg.data.cache_dir, cfg.data.root)  # a cache in the data folder stops here, before the run folder
        # the folder summary and the disk cache, once per machine; fixes data.mask_encoding before the config is saved
        prepare_training_data(cfg, accelerator.is_local_main_process)
        split = resolve_split(cfg.data.root, find_samples(cfg.data.root), cfg.data.split_seed, cfg.data.test_fraction,
                              cfg.data.val_fraction, cfg.data.val_min_images)
        run, state, progress = create_run(cfg.output_dir, cfg.run_name, accelerator), None, Progress()
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_process(cfg.train.cpu_threads))
    logger.info(config_to_yaml(cfg).rstrip())
    run.claim(accelerator)
    logger.info(
        f"Run folder {run}; data {cfg.data.root} ({len(split.train)} train / {len(split.val)} validation / "
        f"{len(split.test)} test, split from {split.source}); {accelerator.num_processes} process(es) on "
        f"{accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )
    if run.keeps_copy(accelerator) and state is None:
        run.write_start(cfg, split, environment(accelerator, cfg), plan=options.plan)
    if changes:
        logger.info(f"Resuming with a changed config: {describe(changes)} (written to {run.config})")
        if run.keeps_copy(accelerator):
            run.write_config(cfg)
    start_trackers(accelerator, cfg, run)
    return run, split, progress, state


def load_state(accelerator: Accelerator, state: Path, progress: Progress) -> None:
    """Restore model, optimizer, scheduler, EMA, sampler and RNG states saved by :meth:`RunDir.save_state`."""
    try:
        accelerator.load_state(str(state))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{state}: cannot load training state ({str(exc).splitlines()[0]})") from None
    partial = progress.partial
    logger.info(f"Resumed from {state} after epoch {progress.epoch}" + (
        f" and {partial['batches']} batches of epoch {progress.epoch + 1} (preempted)" if partial else ""))
