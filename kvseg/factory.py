"""Factories of a training run: the accelerator, the model, and everything the epoch loop works with.

:func:`build_training` builds the model, optimizer, schedule, weight average, loss and loaders from
the config, each by its own factory, and prepares them with ``accelerate``; :mod:`kvseg.train` runs
the loop over what it returns.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from kvseg.config import Config, config_to_dict
from kvseg.data import Split, find_samples
from kvseg.dataset import SegmentationDataset, build_dataloaders, build_datasets
from kvseg.errors import ConfigError
from kvseg.evaluate import LogitsFn, torch_logits
from kvseg.losses import build_loss
from kvseg.model import build_model
from kvseg.optim import build_ema, build_optimizer, build_scheduler
from kvseg.runs import RunDir
from kvseg.runtime import describe_machine, no_accelerator, resolve_mixed_precision


@dataclass
class Training:
    """What the epoch loop works with: model, optimizer and loaders prepared by ``accelerate``."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: AveragedModel | None
    loss_fn: torch.nn.Module
    datasets: dict[str, SegmentationDataset]
    loaders: dict[str, DataLoader]
    logits: LogitsFn  # what is evaluated: the averaged weights when ``ema`` is on, else the model
    weights: torch.nn.Module  # what is checkpointed: the same, unwrapped


def build_training(cfg: Config, split: Split, accelerator: Accelerator) -> Training:
    """Model, optimizer, per-step schedule, weight average, loss and a loader per split, prepared and registered.

    The schedule and the weight average are registered for ``save_state`` so that a resume restores them.
    """
    model = prepare_model(cfg, accelerator)
    optimizer = build_optimizer(model, cfg.train)
    datasets = build_datasets(cfg, find_samples(cfg.data.root), dict(split.items()))
    loaders = build_dataloaders(cfg, datasets, accelerator.num_processes, pin_memory=accelerator.device.type == "cuda")
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    scheduler = build_scheduler(optimizer, cfg.train, math.ceil(len(loaders["train"]) / cfg.train.grad_accum_steps))
    ema = build_ema(accelerator.unwrap_model(model), cfg.train)
    for stateful in (scheduler, ema):
        if stateful is not None:
            accelerator.register_for_checkpointing(stateful)
    weights = ema.module if ema is not None else accelerator.unwrap_model(model)
    return Training(model, optimizer, scheduler, ema, build_loss(cfg.train), datasets, loaders,
                    scoring_fn(model, ema, cfg, accelerator), weights)


def build_accelerator(cfg: Config, mixed_precision: str = "auto") -> Accelerator:
    """The accelerator of a run: kvseg's precision and device policy (:mod:`kvseg.runtime`), seeded sampling, trackers.

    Raises:
        ConfigError: a tracker in ``train.trackers`` is not installed.
    """
    for tracker in cfg.train.trackers:
        if importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"config key 'train.trackers': {tracker} is not installed (pip install 'kvseg[{tracker}]')")
    return Accelerator(
        cpu=no_accelerator(),
        mixed_precision=resolve_mixed_precision(mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
        log_with=list(cfg.train.trackers) or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=cfg.output_dir),
    )


def environment(accelerator: Accelerator) -> dict:
    """The machine (:func:`kvseg.runtime.describe_machine`) and how this run uses it."""
    return {**describe_machine(), "device": str(accelerator.device), "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "mixed_precision": accelerator.mixed_precision}


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


def prepare_model(cfg: Config, accelerator: Accelerator) -> torch.nn.Module:
    """The U-Net of ``cfg``, with SyncBatchNorm under multi-GPU DDP (``train.sync_batchnorm``) and channels_last."""
    model: torch.nn.Module = build_model(cfg.model)
    sync = cfg.train.sync_batchnorm
    if sync == "on" or (sync == "auto" and accelerator.num_processes > 1 and accelerator.device.type == "cuda"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(memory_format=torch.channels_last) if cfg.train.channels_last else model


def scoring_fn(model: torch.nn.Module, ema: AveragedModel | None, cfg: Config, accelerator: Accelerator) -> LogitsFn:
    """The logits function that is evaluated and checkpointed: the EMA weights when on, else the model."""
    if ema is None:
        return torch_logits(model, cfg.train.channels_last)
    averaged = torch_logits(ema.module, cfg.train.channels_last)

    def logits(images: torch.Tensor) -> torch.Tensor:
        with accelerator.autocast():  # the averaged copy is not prepared: give it the run's precision
            return averaged(images)

    return logits
