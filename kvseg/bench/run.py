"""Benchmark a trained run: inference latency per backend, IoU parity with PyTorch fp32, training speed.

Backends are described in :mod:`kvseg.deploy.backends`; parity is :func:`kvseg.evaluation.evaluate.evaluate` of each
backend against torch-fp32 on the test split; training speed is :mod:`kvseg.bench.training`; the
Markdown report is :mod:`kvseg.bench.report`. GPU timings synchronise before the clock is read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.data import DataLoader

from kvseg.bench.loader import measure_loader
from kvseg.bench.training import DEFAULT, Budget, history_summary, measure_training
from kvseg.bench.video import measure_run_video
from kvseg.deploy.backends import Backend, Skipped, build_backend
from kvseg.evaluation.datasets import eval_datasets
from kvseg.evaluation.evaluate import LogitsFn, evaluate
from kvseg.runs.checkpoint import threshold_of
from kvseg.runs.folder import RunDir
from kvseg.runtime import describe_machine

logger = logging.getLogger(__name__)

FP32_IOU_TOLERANCE = 1e-4  # an fp32 ONNX backend further than this from torch-fp32 is flagged


def measure_latency(backend: Backend, batch: np.ndarray, budget: Budget) -> dict:
    """Median, p90, p99 latency in ms and images/s of one batch.

    After ``budget.warmup_steps`` untimed calls, one timed call sizes the number of timed calls to
    ``budget.latency_seconds`` (within ``min_iters``..``max_iters``).
    """
    call = backend.timed(batch)
    for _ in range(budget.warmup_steps):
        call()
    backend.synchronize()
    start = time.perf_counter()
    call()
    backend.synchronize()
    iters = budget.iters(time.perf_counter() - start)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        backend.synchronize()
        times.append(time.perf_counter() - start)
    times_ms = np.array(times) * 1e3
    median = float(np.median(times_ms))
    result = {"batch_size": len(batch), "median_ms": median, "p90_ms": float(np.percentile(times_ms, 90)),
              "p99_ms": float(np.percentile(times_ms, 99)), "images_per_s": len(batch) / (median / 1e3), "iters": iters}
    if backend.copy_seconds is not None:
        result["copy"] = backend.copy_seconds(batch)
    return result


def _recording(logits_fn: LogitsFn) -> tuple[LogitsFn, list[torch.Tensor]]:
    """``logits_fn``, keeping every output in order."""
    outputs: list[torch.Tensor] = []

    def record(images: torch.Tensor) -> torch.Tensor:
        outputs.append(logits_fn(images))
        return outputs[-1]

    return record, outputs


def _replaying(outputs: list[torch.Tensor]) -> LogitsFn:
    """The recorded outputs again, batch by batch, for the same loader in the same order."""
    replay = iter(outputs)
    return lambda images: next(replay)


def measure_parity(backends: dict[str, Backend], loader: DataLoader, threshold: float) -> dict:
    """IoU and Dice of every backend on the whole test split, and how far each is from torch-fp32.

    torch-fp32 runs once; its logits are kept (the test split in float32) and compared with every
    other backend's batch by batch.
    """
    results, reference = {}, None
    if "torch-fp32" in backends:
        record, outputs = _recording(backends["torch-fp32"].logits)
        results["torch-fp32"] = evaluate(record, loader, threshold)
        reference = results["torch-fp32"]
    for name, backend in backends.items():
        if name != "torch-fp32":
            results[name] = evaluate(backend.logits, loader, threshold,
                                     reference=_replaying(outputs) if reference is not None else None)
    report = {}
    for name, result in results.items():
        entry = {"iou_per_image": result.per_image.iou, "iou_dataset": result.dataset.iou,
                 "dice_per_image": result.per_image.dice, "dice_dataset": result.dataset.dice,
                 "num_images": result.num_images}
        if reference is not None:
            entry["iou_diff_vs_torch_fp32"] = result.per_image.iou - reference.per_image.iou
            entry["pixels_differing_vs_torch_fp32"] = 1 - result.agreement.same_class if result.agreement else 0.0
            fp32 = name in ("ort-fp32", "ort-cuda-fp32")
            entry["flagged"] = bool(fp32 and abs(entry["iou_diff_vs_torch_fp32"]) > FP32_IOU_TOLERANCE)
        report[name] = entry
    return report


def benchmark_run(
    run: RunDir,
    backends: list[str],
    batch_sizes: list[int],
    budget: Budget = DEFAULT,
    train: bool = True,
    data_dir: str | None = None,
    video_frames: int = 0,
    loader: bool = True,
) -> dict:
    """Latency, parity and (with ``train``) training speed for ``run``; returns the report dict (see the README).

    ``budget`` sizes every measurement. With ``loader``, also data loading alone
    (:mod:`kvseg.bench.loader`); with ``video_frames``, the end-to-end video row (:mod:`kvseg.bench.video`).
    """
    model, cfg, payload = run.load_model()
    datasets = eval_datasets(cfg, run, data_dir)
    report: dict = {"run": str(run), "machine": describe_machine(), "model": asdict(cfg.model),
                    "image_size": cfg.data.image_size, "backends": {}, "skipped": {}}
    loaded: dict[str, Backend] = {}
    for name in backends:
        try:
            loaded[name] = build_backend(name, model, run.onnx)
        except Skipped as reason:
            report["skipped"][name] = str(reason)
            logger.info(f"skipped {name}: {reason}")
    rng = np.random.default_rng(0)
    size = cfg.data.image_size
    for name, backend in loaded.items():
        entry = {"device": backend.device, "provider": backend.provider, "notes": backend.notes, "latency": []}
        for batch_size in batch_sizes:
            batch = rng.normal(size=(batch_size, 3, size, size)).astype(np.float32)
            entry["latency"].append(measure_latency(backend, batch, budget))
        report["backends"][name] = entry
        logger.info(f"timed {name}: "
                    + ", ".join(f"batch {row['batch_size']} {row['median_ms']:.2f} ms" for row in entry["latency"]))
    report["providers_used"] = sorted({b.provider for b in loaded.values() if b.provider})
    report["parity"] = measure_parity(loaded, DataLoader(datasets["test"], batch_size=8), threshold_of(payload))
    report["parity_split"] = "test"  # reported only: export verifies, and decides, on the validation split
    report["flagged"] = [name for name, entry in report["parity"].items() if entry.get("flagged")]
    logger.info(f"parity on {len(datasets['test'])} test images: " + ", ".join(
        f"{name} IoU {entry['iou_per_image']:.4f}" for name, entry in report["parity"].items()))
    if train:
        report["training"] = measure_training(cfg, datasets["train"], budget)
    report["training_history"] = history_summary(run.history)
    if loader:
        train_set = datasets["train"]
        report["loader"] = measure_loader(cfg, train_set.samples, train_set.encoding, budget.loader_seconds)
    if video_frames > 0:
        report["video"] = measure_run_video(loaded, cfg, datasets["test"], video_frames, threshold_of(payload))
    return report
