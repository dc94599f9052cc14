"""Training with accelerate: data set-up, the epoch loop, evaluation, run folders, checkpoints, resume.

``Accelerator`` does device placement, DDP, mixed precision and gradient accumulation; every piece
of rank logic goes through it. The loop is two plain functions, :func:`train_one_epoch` and
:func:`evaluate`, driven by :func:`run_training`.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path

import cv2
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, set_seed
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

import kvseg
from kvseg.augment import build_eval_transform, build_train_transform
from kvseg.checkpoint import json_safe, save_model_checkpoint, write_json_atomic
from kvseg.config import Config, DataConfig, config_to_yaml, load_config
from kvseg.data import SegmentationDataset, Split, find_samples, resolve_split, write_split
from kvseg.distributed import check_process_group
from kvseg.errors import CheckpointError, DatasetNotFoundError, KvsegError
from kvseg.metrics import SegmentationMetrics
from kvseg.model import build_model
from kvseg.report import write_report
from kvseg.synthetic import write_synthetic_dataset
from kvseg.tta import tta_logits

DEFAULT_DATA_ROOT = DataConfig.root
SYNTHETIC_ROOT = "data/synthetic-kvasir-instrument"


class NonFiniteLossError(KvsegError):
    """The training loss became NaN or infinite."""


@dataclass
class RunOptions:
    """What the command line decides beyond the config."""

    data_dir_given: bool = False  # an explicit data dir must exist: no fall-back to synthetic data
    resume: str | None = None
    mixed_precision: str = "auto"  # "auto", "no", "fp16" or "bf16"


@dataclass
class EpochStats:
    loss: float
    seconds: float
    images: int
    lr: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RunProgress:
    """What a resumed run needs besides the accelerate state: the completed epochs."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_iou: float = -1.0


# ---------------------------------------------------------------------------------------------
# Set-up


def cpu_supports_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX), so autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def no_accelerator() -> bool:
    """True when training must run on the CPU: asked for, or no GPU-like device is present.

    ``accelerate launch`` with several processes and no GPU starts them through torchrun without
    telling them to use the CPU; passing ``cpu=True`` then makes ``Accelerator`` set up gloo DDP.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true":
        return True
    has_xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    return not (torch.cuda.is_available() or has_xpu or has_mps)


def resolve_mixed_precision(requested: str) -> str:
    """The precision to train in.

    ``auto`` keeps what ``accelerate launch`` was told (``ACCELERATE_MIXED_PRECISION``), except that
    on a CPU-only machine with native bf16 a launcher value of ``no`` becomes ``bf16``: it is
    several times faster there. Any explicit value is used as it is.
    """
    if requested != "auto":
        return requested
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher == "no" and no_accelerator() and cpu_supports_bf16():
        return "bf16"
    return launcher


def prepare_data_root(cfg: Config, options: RunOptions, accelerator: Accelerator) -> Path:
    """The dataset folder to train on; writes the synthetic stand-in when no dataset is there.

    Falls back to synthetic data only when the default location is empty and no data dir was
    given explicitly.
    """
    root = Path(cfg.data.root)
    if root.exists():
        return root
    if options.data_dir_given or cfg.data.root != DEFAULT_DATA_ROOT:
        raise DatasetNotFoundError(f"{root}: dataset folder not found (expected images/ and masks/ inside)")
    synthetic = Path(SYNTHETIC_ROOT)
    recipe = {
        "num_images": cfg.data.synthetic_images,
        "size": cfg.data.synthetic_size,
        "test_fraction": cfg.data.synthetic_test_fraction,
        "seed": cfg.data.split_seed,
        "kvseg_version": kvseg.__version__,
    }
    accelerator.print(f"No dataset at {root}; training on the synthetic stand-in in {synthetic}.")
    with accelerator.main_process_first():
        recipe_file = synthetic / "synthetic.json"
        if accelerator.is_main_process and (
            not recipe_file.is_file() or json.loads(recipe_file.read_text()) != recipe
        ):
            shutil.rmtree(synthetic, ignore_errors=True)
            tmp = synthetic.with_name(synthetic.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            write_synthetic_dataset(tmp, **{k: v for k, v in recipe.items() if k != "kvseg_version"})
            (tmp / "synthetic.json").write_text(json.dumps(recipe, indent=2))
            tmp.rename(synthetic)
    return synthetic


def _init_worker(worker_id: int) -> None:
    """DataLoader workers: one OpenCV thread each (augmentations are seeded per sample, not per worker)."""
    cv2.setNumThreads(1)


def cpu_threads_per_process(requested: int) -> int:
    """Torch threads for one of the processes on this machine; ``requested`` > 0 wins.

    ``accelerate launch`` without ``--cpu`` sets OMP_NUM_THREADS=1, which halves CPU training speed
    on a two-core machine; kvseg gives each local process its share of the cores instead.
    """
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_num_workers(num_processes: int) -> int:
    """One worker fewer than the cores each process gets, at least one, at most eight."""
    return max(1, min(8, (os.cpu_count() or 1) // num_processes - 1))


def build_dataloaders(
    cfg: Config, root: Path, split: Split, pin_memory: bool, num_processes: int = 1
) -> tuple[DataLoader, DataLoader, SegmentationDataset, SegmentationDataset]:
    """Train and test loaders over ``split``; workers run the albumentations pipelines."""
    samples = find_samples(root)
    common = dict(image_size=cfg.data.image_size, mask_threshold=cfg.data.mask_threshold, cache=cfg.data.cache)
    train_set = SegmentationDataset(
        [samples[i] for i in split.train], transform=build_train_transform(cfg.augment), seed=cfg.train.seed, **common
    )
    test_set = SegmentationDataset([samples[i] for i in split.test], transform=build_eval_transform(cfg.augment), **common)
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers(num_processes)
    loader_args = dict(
        batch_size=cfg.train.batch_size,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        worker_init_fn=_init_worker,
    )
    train_loader = DataLoader(train_set, shuffle=True, **loader_args)
    test_loader = DataLoader(test_set, shuffle=False, **loader_args)
    return train_loader, test_loader, train_set, test_set


def collect_environment(accelerator: Accelerator) -> dict:
    """Versions, devices, process count and precision of this run, saved in the run folder."""
    packages = {}
    for name in ("torch", "accelerate", "albumentations", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "scikit-learn"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "kvseg": kvseg.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": packages,
        "device": str(accelerator.device),
        "cuda_devices": devices,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# Files of a run


def new_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """``output_dir/run_name`` (a time stamp by default), the same on every process."""
    name = [cfg.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(name)
    run_dir = Path(cfg.output_dir) / name[0]
    if accelerator.is_main_process:
        if (run_dir / "checkpoints").exists():
            raise CheckpointError(f"{run_dir}: run folder already holds checkpoints; use --resume {run_dir} or another name")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return run_dir


def lock_run_dir(run_dir: Path, accelerator: Accelerator) -> object:
    """Hold an exclusive lock on ``run_dir`` for as long as the returned handle lives.

    A second training process on the same folder (a resume started while the first run, or an
    orphaned worker of it, still writes) stops with a clear error instead of interleaving
    checkpoints. The lock dies with its process, SIGKILL included.
    """
    handle, held = None, True
    if accelerator.is_main_process:
        handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 - kept open until training ends
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            held = False
    flag = [held]
    broadcast_object_list(flag)
    if not flag[0]:
        raise CheckpointError(f"{run_dir}: another training process is still writing this run folder; stop it first")
    return handle


def state_dir_of(run_dir: Path) -> Path:
    """The accelerate state of the last completed epoch, falling back to one left by a crashed swap."""
    checkpoints = Path(run_dir) / "checkpoints"
    for candidate in (checkpoints / "state", checkpoints / "state.old"):
        if (candidate / "progress.json").is_file():
            return candidate
    raise CheckpointError(f"{run_dir}: no checkpoint to resume from (expected checkpoints/state/progress.json)")


def save_training_state(accelerator: Accelerator, run_dir: Path, progress: RunProgress) -> None:
    """``save_state`` into a fresh folder, then swap it in: a crash leaves the previous state whole."""
    checkpoints = run_dir / "checkpoints"
    tmp, current, old = checkpoints / "state.tmp", checkpoints / "state", checkpoints / "state.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        payload = {"epoch": progress.epoch, "history": progress.history, "best_iou": progress.best_iou}
        write_json_atomic(tmp / "progress.json", payload)
        shutil.rmtree(old, ignore_errors=True)
        if current.exists():
            current.rename(old)
        tmp.rename(current)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# The loop


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    accelerator: Accelerator,
    channels_last: bool,
    description: str,
) -> EpochStats:
    """One pass over ``loader``; the loss is averaged over all samples on all processes."""
    model.train()
    start = time.perf_counter()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    # The bar redraws from a thread that competes for the GIL: keep it slow, and off when
    # the output is not a terminal (logs, CI), where it shows nothing anyway.
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}"), transient=True, refresh_per_second=2,
        disable=not (accelerator.is_main_process and sys.stdout.isatty()),
    )
    with progress:
        task = progress.add_task(description, total=len(loader), loss="-")
        for step, (images, masks, _) in enumerate(loader):
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                logits = model(images)
                loss = loss_fn(logits.float(), masks.float())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double() * len(images)
            count += len(images)
            if step % 10 == 0 and accelerator.is_main_process:
                progress.update(task, loss=f"{loss.item():.4f}")
            progress.advance(task)
    loss_sum, count = accelerator.reduce(torch.stack([loss_sum, count]), reduction="sum")
    return EpochStats(
        loss=float(loss_sum / count),
        seconds=time.perf_counter() - start,
        images=int(count),
        lr=optimizer.param_groups[0]["lr"],
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    accelerator: Accelerator,
    threshold: float,
    channels_last: bool,
    tta: Sequence[str] = (),
) -> dict:
    """Test loss and every metric of :class:`~kvseg.metrics.SegmentationMetrics` over ``loader``.

    Outputs of all processes are gathered with ``gather_for_metrics``, which drops the samples that
    were repeated to even out the last batch: each image counts exactly once. With ``tta``, the
    probabilities are averaged over those dihedral transforms (:mod:`kvseg.tta`).
    """
    model.eval()
    metrics = SegmentationMetrics(threshold=threshold)
    indices = []

    def predict(images: torch.Tensor) -> torch.Tensor:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return model(images).float()

    for images, masks, index in loader:
        logits = tta_logits(predict, images, tta) if tta else predict(images)
        logits, masks, index = accelerator.gather_for_metrics((logits.contiguous(), masks, index))
        metrics.update(logits, masks)
        indices.extend(index.tolist())
    result = metrics.compute()
    ids = [loader.dataset.samples[i].id for i in indices]
    result["per_image_iou"] = dict(zip(ids, (float(v) for v in metrics.per_image()["iou"])))
    if tta:
        result["tta_transforms"] = list(tta)
    return result


def _epoch_line(epoch: int, epochs: int, stats: EpochStats) -> str:
    return (
        f"Epoch [{epoch}/{epochs}], Average Loss: {stats.loss:.4f}, "
        f"time {stats.seconds:.1f}s, {stats.images_per_s:.1f} images/s"
    )


def _eval_line(metrics: dict) -> str:
    return (
        f"Test Loss: {metrics['loss']:.4f}, IoU: {metrics['per_image']['iou']:.4f} (per-image) "
        f"{metrics['dataset']['iou']:.4f} (dataset), Dice: {metrics['per_image']['dice']:.4f}, "
        f"AP: {metrics['average_precision']:.4f}, ROC AUC: {metrics['roc_auc']:.4f}"
    )


def _use_sync_batchnorm(cfg: Config, accelerator: Accelerator) -> bool:
    if cfg.train.sync_batchnorm == "auto":
        return accelerator.num_processes > 1 and accelerator.device.type == "cuda"
    return cfg.train.sync_batchnorm == "on"


def _resume_progress(run_dir: Path, cfg: Config) -> tuple[Path, RunProgress, Split]:
    state_dir = state_dir_of(run_dir)
    stored = json.loads((state_dir / "progress.json").read_text())
    previous = load_config(run_dir / "config.yaml")
    if previous.model != cfg.model or previous.data.image_size != cfg.data.image_size:
        raise CheckpointError(
            f"{run_dir}: checkpoint was trained with model {previous.model} at image size {previous.data.image_size}; "
            f"cannot resume with model {cfg.model} at image size {cfg.data.image_size}"
        )
    split = resolve_split(run_dir, find_samples(cfg.data.root), cfg.data.split_seed, cfg.data.test_fraction)
    progress = RunProgress(epoch=stored["epoch"], history=stored["history"], best_iou=stored["best_iou"])
    return state_dir, progress, split


def run_training(cfg: Config, options: RunOptions) -> Path:
    """Train ``cfg`` end to end and return the run folder; see the README for what it holds."""
    accelerator = Accelerator(
        cpu=no_accelerator(),
        mixed_precision=resolve_mixed_precision(options.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
    )
    check_process_group(accelerator.num_processes)
    if options.resume:
        run_dir = Path(options.resume)
        state_dir, progress, split = _resume_progress(run_dir, cfg)
        root = Path(cfg.data.root)
    else:
        root = prepare_data_root(cfg, options, accelerator)
        cfg.data.root = str(root)
        samples = find_samples(root)
        split = resolve_split(root, samples, cfg.data.split_seed, cfg.data.test_fraction)
        run_dir = new_run_dir(cfg, accelerator)
        state_dir, progress = None, RunProgress()
        if accelerator.is_main_process:
            write_split(split, run_dir)
            (run_dir / "config.yaml").write_text(config_to_yaml(cfg))

    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_process(cfg.train.cpu_threads))
    accelerator.print(config_to_yaml(cfg).rstrip())
    run_lock = lock_run_dir(run_dir, accelerator)  # noqa: F841 - held until training returns
    accelerator.print(
        f"Run folder {run_dir}; data {root} ({len(split.train)} train / {len(split.test)} test, split from {split.source}); "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "environment.json", collect_environment(accelerator))

    set_seed(cfg.train.seed)
    model: torch.nn.Module = build_model(cfg.model)
    if _use_sync_batchnorm(cfg, accelerator):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if cfg.train.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    accelerator.register_for_checkpointing(scheduler)
    train_loader, test_loader, train_set, _ = build_dataloaders(
        cfg, root, split, pin_memory=accelerator.device.type == "cuda", num_processes=accelerator.num_processes
    )
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    if state_dir is not None:
        try:
            accelerator.load_state(str(state_dir))
        except (RuntimeError, KeyError, ValueError) as exc:
            reason = str(exc).splitlines()[0]
            raise CheckpointError(f"{state_dir}: cannot load training state ({reason})") from None
        accelerator.print(f"Resumed from {state_dir} after epoch {progress.epoch}")

    epochs = cfg.train.epochs
    metrics = None
    for epoch in range(progress.epoch + 1, epochs + 1):
        train_loader.set_epoch(epoch)
        train_set.set_epoch(epoch)
        stats = train_one_epoch(
            model, train_loader, optimizer, loss_fn, accelerator, cfg.train.channels_last, f"epoch {epoch}/{epochs}"
        )
        if not math.isfinite(stats.loss):
            raise NonFiniteLossError(
                f"epoch {epoch}: training loss is {stats.loss}; stopped (last good checkpoint: "
                f"{run_dir / 'checkpoints'}, epoch {progress.epoch}); try a lower train.lr or --mixed-precision no"
            )
        scheduler.step()
        accelerator.print(_epoch_line(epoch, epochs, stats))
        record = {
            "epoch": epoch, "train_loss": stats.loss, "test_loss": None, "seconds": stats.seconds,
            "images_per_s": stats.images_per_s, "lr": stats.lr,
        }
        evaluate_now = epoch == epochs or (cfg.train.eval_every > 0 and epoch % cfg.train.eval_every == 0)
        metrics = None
        if evaluate_now:
            metrics = evaluate(model, test_loader, accelerator, cfg.train.threshold, cfg.train.channels_last)
            record["test_loss"] = metrics["loss"]
            record["test_iou"] = metrics["per_image"]["iou"]
            accelerator.print(_eval_line(metrics))
        progress.epoch = epoch
        progress.history.append(record)
        unwrapped = accelerator.unwrap_model(model)
        if accelerator.is_main_process:
            save_model_checkpoint(run_dir / "checkpoints" / "last.pt", unwrapped, cfg, epoch, metrics)
            if metrics is not None and metrics["per_image"]["iou"] > progress.best_iou:
                progress.best_iou = metrics["per_image"]["iou"]
                save_model_checkpoint(run_dir / "checkpoints" / "best.pt", unwrapped, cfg, epoch, metrics)
            write_json_atomic(run_dir / "history.json", json_safe(progress.history))
        save_training_state(accelerator, run_dir, progress)

    if metrics is None:  # resumed a run that had already finished: evaluate the final weights again
        metrics = evaluate(model, test_loader, accelerator, cfg.train.threshold, cfg.train.channels_last)
        accelerator.print(_eval_line(metrics))
    if cfg.eval.tta:
        tta = evaluate(model, test_loader, accelerator, cfg.train.threshold, cfg.train.channels_last, cfg.eval.tta)
        accelerator.print(f"With TTA ({len(cfg.eval.tta)} transforms): {_eval_line(tta)}")
        metrics["tta"] = {k: v for k, v in tta.items() if k not in ("per_image_iou", "curves")}
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "metrics.json", json_safe({"epoch": progress.epoch, **metrics}))
        write_report(run_dir)
    accelerator.print(f"Wrote {run_dir}")
    accelerator.end_training()
    return run_dir
