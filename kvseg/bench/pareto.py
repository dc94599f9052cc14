"""One point of the speed/accuracy front: what a trained run costs and scores (``benchmarks/pareto.py`` draws the front).

For a finished run: parameters, GFLOPs per image (``torch.utils.flop_counter.FlopCounterMode``:
convolutions and matrix products, 2 FLOPs per multiply-add; BatchNorm, activations and resizing are
not counted, and BatchNorm folds into the convolutions on export), the per-image test Dice and IoU
that training scored once with the validation-selected weights (no TTA, from metrics.json), batch-1
latency at a fixed size on 1 and on 2 threads per inference backend (:mod:`kvseg.deploy.backends`,
timed by :func:`kvseg.bench.run.measure_latency`), and the end-to-end 720p video fps of the fastest
backend on 2 threads (:mod:`kvseg.bench.video`).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kvseg.bench.run import measure_latency
from kvseg.bench.training import Budget
from kvseg.bench.video import measure_run_video
from kvseg.deploy.backends import Skipped, build_backend
from kvseg.evaluation.datasets import eval_datasets
from kvseg.models.build import count_parameters, describe
from kvseg.runs.checkpoint import threshold_of
from kvseg.runs.folder import RunDir

logger = logging.getLogger(__name__)

PARETO_BACKENDS = ("torch-fp32", "ort-fp32", "ort-int8", "ov-fp32", "ov-int8")
THREADS = (1, 2)


def model_cost(model: nn.Module, size: int) -> dict:
    """Parameters and GFLOPs of one (1, 3, size, size) image through ``model`` (2 FLOPs per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, 3, size, size))
    flops = counter.get_total_flops()
    return {"parameters": count_parameters(model), f"gflops_{size}": flops / 1e9, f"gmacs_{size}": flops / 2e9}


def run_scores(run: RunDir) -> dict:
    """Test per-image Dice and IoU (no TTA), validation Dice, the selected epoch and training minutes of a finished run."""
    metrics = json.loads(run.metrics.read_text())
    history = json.loads(run.history.read_text()) if run.history.is_file() else []
    validation = metrics.get("validation") or {}
    return {
        "test_dice": metrics["test"]["per_image"]["dice"], "test_iou": metrics["test"]["per_image"]["iou"],
        "test_images": metrics["test"]["num_images"],
        "val_dice": (validation.get("per_image") or {}).get("dice"), "selected_epoch": metrics.get("epoch"),
        "epochs": metrics.get("epochs_trained"), "training_minutes": sum(row["seconds"] for row in history) / 60,
    }


def thread_latency(run: RunDir, model: nn.Module, size: int, budget: Budget, backends=PARETO_BACKENDS,
                   threads=THREADS) -> tuple[dict, dict]:
    """Batch-1 median latency (ms) at ``size`` x ``size`` of each backend on each thread count, and the skipped ones.

    Returns ``({backend: {"1": ms, "2": ms}}, {backend: reason})``.
    """
    batch = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    latency: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    previous = torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            for name in backends:
                try:
                    backend = build_backend(name, model, run.onnx, threads=count)
                except Skipped as reason:
                    skipped[name] = str(reason)
                    continue
                latency.setdefault(name, {})[str(count)] = measure_latency(backend, batch, budget)["median_ms"]
                logger.info(f"{run.path.name}: {name} on {count} thread(s) {latency[name][str(count)]:.2f} ms")
    finally:
        torch.set_num_threads(previous)
    return latency, skipped


def best(latency: dict, threads: int) -> tuple[str | None, float | None]:
    """The fastest backend on ``threads`` threads and its frames per second (batch 1)."""
    timed = {name: rows[str(threads)] for name, rows in latency.items() if str(threads) in rows}
    if not timed:
        return None, None
    name = min(timed, key=timed.get)
    return name, 1e3 / timed[name]


def video_fps(run: RunDir, model: nn.Module, backend: str, frames: int, data_dir: str | None = None) -> dict:
    """End-to-end fps of a 720p clip made from the run's test images, segmented by ``backend`` on 2 threads."""
    _, cfg, payload = run.load_model()
    test_set = eval_datasets(cfg, run, data_dir)["test"]
    loaded = {backend: build_backend(backend, model, run.onnx, threads=2)}
    row = measure_run_video(loaded, cfg, test_set, frames, threshold_of(payload))["rows"][backend]
    return {"video_fps_720p": row["fps"], "video_backend": backend, "video_limiting_stage": row["limiting_stage"],
            "video_frames": row["frames"]}


def measure_point(run: RunDir, size: int, budget: Budget, video_frames: int, data_dir: str | None = None) -> dict:
    """Every figure of one point of the front (see the module doc) for the finished, exported ``run``."""
    model, cfg, _ = run.load_model()
    point = {"model": describe(cfg.model), "image_size": cfg.data.image_size, "latency_size": size,
             **model_cost(model, size), **run_scores(run)}
    load_before = os.getloadavg()
    point["latency_ms"], point["skipped"] = thread_latency(run, model, size, budget)
    for count, key in ((1, "fps_1_thread"), (2, "fps_2_threads")):
        name, fps = best(point["latency_ms"], count)
        point[f"{key}_{size}"], point[f"best_backend_{key.removeprefix('fps_')}"] = fps, name
    fastest = point["best_backend_2_threads"]
    if video_frames and fastest:
        point.update(video_fps(run, model, fastest, video_frames, data_dir))
    point["load_average"] = {"before": load_before, "after": os.getloadavg()}
    return point


def pareto_front(points: list[dict], speed: str, score: str = "test_dice") -> list[int]:
    """Indexes of the points no other point beats on both ``speed`` and ``score`` (higher is better on each)."""
    front = []
    for i, p in enumerate(points):
        if p.get(speed) is None:
            continue
        dominated = any(q.get(speed) is not None and q[speed] >= p[speed] and q[score] >= p[score]
                        and (q[speed] > p[speed] or q[score] > p[score]) for q in points)
        if not dominated:
            front.append(i)
    return front
