"""Benchmarks: inference latency per backend, IoU parity with PyTorch fp32, training speed.

Backends (each skipped with a one-line reason when it cannot run here):

* ``torch-fp32``: PyTorch eager, fp32, NCHW.
* ``torch-fast``: the device's fast path: channels_last with bf16 autocast on a CPU with native bf16
  (fp32 otherwise); on a GPU channels_last, fp16 autocast and ``torch.compile`` when it works.
* ``ort-fp32``: ONNX Runtime, CPU provider, all graph optimisations, one thread per core.
* ``ort-int8``: the static-int8 QDQ model on the CPU provider.
* ``ort-cuda-fp32`` / ``ort-cuda-fp16``: CUDA provider with I/O binding, so host/device copies are
  outside the timed region (their cost is reported separately).
* ``ort-tensorrt``: TensorRT provider (fp16), when it loads.

GPU timings synchronise before the clock is read. A provider that ONNX Runtime lists but cannot
load (no CUDA libraries, wrong cuDNN) is reported as skipped — never run on the CPU under its name.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

import kvseg
from kvseg.augment import build_train_transform
from kvseg.checkpoint import load_run_datasets, load_trained_model
from kvseg.config import Config
from kvseg.data import SegmentationDataset
from kvseg.metrics import SegmentationMetrics
from kvseg.model import build_model
from kvseg.train import cpu_supports_bf16, default_num_workers, no_accelerator, resolve_mixed_precision

BACKENDS = ("torch-fp32", "torch-fast", "ort-fp32", "ort-int8", "ort-cuda-fp32", "ort-cuda-fp16", "ort-tensorrt")
STUDY_SECONDS_PER_EPOCH = 300.0
STUDY_TRAIN_IMAGES = 472
FP32_IOU_TOLERANCE = 1e-4


class Skipped(Exception):
    """A backend that cannot run on this machine; the message says why, in one line."""


# ---------------------------------------------------------------------------------------------
# The machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, GPU, driver and library versions, and the ONNX Runtime providers this build lists."""
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    driver = None
    if gpus:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    packages = {}
    for name in ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "accelerate", "albumentations", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_native_bf16": cpu_supports_bf16(),
        "gpus": gpus,
        "gpu_driver": driver,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
        "kvseg": kvseg.__version__,
        "onnxruntime_providers_listed": ort.get_available_providers(),
    }


# ---------------------------------------------------------------------------------------------
# Backends: each is a function (N, 3, H, W) float32 numpy -> logits float32 numpy, plus timing


@dataclass
class Backend:
    name: str
    run: Callable[[np.ndarray], np.ndarray]  # full call, host in and host out (for parity)
    timed: Callable[[np.ndarray], Callable[[], None]]  # prepares a batch, returns the call to time
    device: str
    provider: str | None = None
    notes: list[str] = field(default_factory=list)
    copy_seconds: Callable[[np.ndarray], dict] | None = None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def torch_backend(model: nn.Module, fast: bool, device: str) -> Backend:
    """PyTorch eager fp32, or the device's fast path (see the module doc)."""
    model = model.to(device).eval()
    notes: list[str] = []
    dtype = None
    if fast:
        model = model.to(memory_format=torch.channels_last)
        if device == "cuda":
            dtype = torch.float16
        elif cpu_supports_bf16():
            dtype = torch.bfloat16
        else:
            notes.append("no native bf16 on this CPU: fp32 channels_last")
        notes.append(f"channels_last, autocast {dtype}".replace("torch.", "") if dtype else "channels_last")
    forward: Callable[[torch.Tensor], torch.Tensor] = model
    if fast and device == "cuda":
        try:
            compiled = torch.compile(model)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                compiled(torch.zeros(1, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last))
            forward = compiled
            notes.append("torch.compile")
        except Exception as exc:  # compile support varies by platform; eager still works
            notes.append(f"torch.compile unavailable ({type(exc).__name__})")

    def call(x: torch.Tensor) -> torch.Tensor:
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            return forward(x)

    def run(images: np.ndarray) -> np.ndarray:
        return call(torch.from_numpy(images).to(device)).float().cpu().numpy()

    def timed(images: np.ndarray) -> Callable[[], None]:
        x = torch.from_numpy(images).to(device)
        return lambda: call(x)

    return Backend("torch-fast" if fast else "torch-fp32", run, timed, device, notes=notes)


def _session(path: Path, providers: list, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4  # a provider that fails to load is reported by kvseg in one line
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers)


def _load_provider(path: Path, provider: str, options: dict | None = None) -> ort.InferenceSession:
    """A session that really runs on ``provider``, or :class:`Skipped` with the reason."""
    if provider not in ort.get_available_providers():
        raise Skipped(f"{provider} is not in this onnxruntime build")
    previous = ort.get_default_logger_severity() if hasattr(ort, "get_default_logger_severity") else 2
    ort.set_default_logger_severity(4)
    try:
        session = _session(path, [(provider, options or {}), "CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types per provider
        raise Skipped(f"{provider} failed to load: {str(exc).strip().splitlines()[0][:160]}") from None
    finally:
        ort.set_default_logger_severity(previous)
    if session.get_providers()[0] != provider:
        raise Skipped(f"{provider} is listed but does not load here (no GPU or its libraries)")
    return session


def ort_cpu_backend(name: str, path: Path) -> Backend:
    if not path.is_file():
        raise Skipped(f"{path} not found")
    threads = os.cpu_count()
    session = _session(path, ["CPUExecutionProvider"], threads=threads)

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"image": images})[0]

    def timed(images: np.ndarray) -> Callable[[], None]:
        return lambda: session.run(["logits"], {"image": images})

    return Backend(name, run, timed, "cpu", "CPUExecutionProvider", notes=[f"{threads} threads, ORT_ENABLE_ALL"])


def ort_gpu_backend(name: str, path: Path, provider: str, options: dict | None = None) -> Backend:
    """CUDA or TensorRT provider with I/O binding: inputs and outputs stay on the GPU while timed."""
    if not path.is_file():
        raise Skipped(f"{path} not found")
    session = _load_provider(path, provider, options)

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"image": images})[0]

    def timed(images: np.ndarray) -> Callable[[], None]:
        binding = session.io_binding()
        binding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0))
        binding.bind_output("logits", "cuda", 0)
        session.run_with_iobinding(binding)
        return lambda: session.run_with_iobinding(binding)

    def copy_seconds(images: np.ndarray) -> dict:
        start = time.perf_counter()
        value = ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0)
        host_to_device = time.perf_counter() - start
        binding = session.io_binding()
        binding.bind_ortvalue_input("image", value)
        binding.bind_output("logits", "cuda", 0)
        session.run_with_iobinding(binding)
        start = time.perf_counter()
        binding.copy_outputs_to_cpu()
        return {"host_to_device_ms": host_to_device * 1e3, "device_to_host_ms": (time.perf_counter() - start) * 1e3}

    return Backend(name, run, timed, "cuda", provider, notes=["I/O binding"], copy_seconds=copy_seconds)


def build_backend(name: str, model: nn.Module, models: dict[str, Path]) -> Backend:
    """The backend called ``name``; raises :class:`Skipped` when it cannot run here."""
    gpu = torch.cuda.is_available()
    if name == "torch-fp32":
        return torch_backend(model, fast=False, device="cuda" if gpu else "cpu")
    if name == "torch-fast":
        return torch_backend(model, fast=True, device="cuda" if gpu else "cpu")
    if name == "ort-fp32":
        return ort_cpu_backend(name, models["fp32"])
    if name == "ort-int8":
        return ort_cpu_backend(name, models["int8"])
    if name == "ort-cuda-fp32":
        return ort_gpu_backend(name, models["fp32"], "CUDAExecutionProvider")
    if name == "ort-cuda-fp16":
        return ort_gpu_backend(name, models["fp16"], "CUDAExecutionProvider")
    if name == "ort-tensorrt":
        cache = models["fp32"].parent / "trt_cache"
        options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
        return ort_gpu_backend(name, models["fp32"], "TensorrtExecutionProvider", options)
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------------------------
# Measurements


def measure_latency(backend: Backend, batch: np.ndarray, warmup: int, iters: int) -> dict:
    """Median, p90, p99 latency in ms and images/s of one batch, after ``warmup`` calls."""
    call = backend.timed(batch)
    for _ in range(warmup):
        call()
    _sync(backend.device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        _sync(backend.device)
        times.append(time.perf_counter() - start)
    times_ms = np.array(times) * 1e3
    median = float(np.median(times_ms))
    result = {
        "batch_size": len(batch),
        "median_ms": median,
        "p90_ms": float(np.percentile(times_ms, 90)),
        "p99_ms": float(np.percentile(times_ms, 99)),
        "images_per_s": len(batch) / (median / 1e3),
        "iters": iters,
    }
    if backend.copy_seconds is not None:
        result["copy"] = backend.copy_seconds(batch)
    return result


def measure_parity(backends: dict[str, Backend], test_set: SegmentationDataset, threshold: float, batch_size: int = 8) -> dict:
    """IoU and Dice of every backend on the whole test split, and how far each is from torch-fp32."""
    logit_threshold = float(np.log(threshold / (1 - threshold)))
    metrics = {name: SegmentationMetrics(threshold=threshold) for name in backends}
    differing = dict.fromkeys(backends, 0)
    total = 0
    for images, masks, _ in DataLoader(test_set, batch_size=batch_size):
        outputs = {name: backend.run(images.numpy()) for name, backend in backends.items()}
        reference = outputs.get("torch-fp32")
        for name, logits in outputs.items():
            metrics[name].update(torch.from_numpy(logits), masks)
            if reference is not None:
                differing[name] += int(((logits > logit_threshold) != (reference > logit_threshold)).sum())
        total += masks.numel()
    results = {}
    reference_result = metrics["torch-fp32"].compute() if "torch-fp32" in metrics else None
    for name, accumulator in metrics.items():
        computed = accumulator.compute()
        entry = {
            "iou_per_image": computed["per_image"]["iou"],
            "iou_dataset": computed["dataset"]["iou"],
            "dice_per_image": computed["per_image"]["dice"],
            "dice_dataset": computed["dataset"]["dice"],
            "num_images": computed["num_images"],
        }
        if reference_result is not None:
            entry["iou_diff_vs_torch_fp32"] = entry["iou_per_image"] - reference_result["per_image"]["iou"]
            entry["pixels_differing_vs_torch_fp32"] = differing[name] / total
            fp32 = name in ("ort-fp32", "ort-cuda-fp32")
            entry["flagged"] = bool(fp32 and abs(entry["iou_diff_vs_torch_fp32"]) > FP32_IOU_TOLERANCE)
        results[name] = entry
    return results


def _train_steps(model: nn.Module, loader: DataLoader, steps: int, warmup: int, step: Callable) -> float:
    """Seconds per image over ``steps`` steps after ``warmup`` steps, cycling the loader."""
    done, images, start = 0, 0, None
    while done < warmup + steps:
        for batch in loader:
            if done == warmup:
                start = time.perf_counter()
            step(batch)
            done += 1
            if done > warmup:
                images += len(batch[0])
            if done == warmup + steps:
                break
    return (time.perf_counter() - start) / images


def measure_training(cfg: Config, train_set: SegmentationDataset, steps: int, warmup: int) -> dict:
    """The harness's training step against a plain fp32 NCHW loop of the same model, in one process.

    Harness: ``Accelerator`` with the precision kvseg picks (``--mixed-precision auto``; bf16 on a
    GPU that has it, as the GPU launcher files set), channels_last, DataLoader workers and the
    shared cache, as ``train_ddp.py`` runs by default.
    Plain: fp32, NCHW, no workers, no cache — the loop a study would write.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transform = build_train_transform(cfg.augment)
    loss_fn = nn.BCEWithLogitsLoss()
    results = {}

    def make_set(cache: bool) -> SegmentationDataset:
        return SegmentationDataset(
            train_set.samples, cfg.data.image_size, transform, cfg.data.mask_threshold, cache=cache, seed=0
        )

    # Plain loop first: it must not profit from a cache the harness filled.
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)

    def plain_step(batch: tuple) -> None:
        images, masks = batch[0].to(device), batch[1].to(device).float()
        loss = loss_fn(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)

    loader = DataLoader(make_set(cache=False), batch_size=cfg.train.batch_size, shuffle=True, num_workers=0)
    results["plain_fp32_nchw"] = _train_steps(model, loader, steps, warmup, plain_step)

    precision = resolve_mixed_precision("auto")
    if device == "cuda" and precision == "no" and torch.cuda.is_bf16_supported():
        precision = "bf16"  # what configs/accelerate/gpu_*.yaml launch with
    accelerator = Accelerator(cpu=no_accelerator(), mixed_precision=precision)
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else default_num_workers(1)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    loader = DataLoader(make_set(cache=True), batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device == "cuda")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()

    def harness_step(batch: tuple) -> None:
        images = batch[0].contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(images).float(), batch[1].float())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)

    # Warm-up of at least one pass fills the cache, as epoch 1 of a real run does.
    results["harness"] = _train_steps(model, loader, steps, max(warmup, len(loader)), harness_step)

    report = {
        "image_size": cfg.data.image_size,
        "base_channels": cfg.model.base_channels,
        "depth": cfg.model.depth,
        "batch_size": cfg.train.batch_size,
        "steps": steps,
        "mixed_precision": accelerator.mixed_precision,
        "num_workers": workers,
        "device": device,
    }
    for name, seconds_per_image in results.items():
        epoch = seconds_per_image * STUDY_TRAIN_IMAGES
        report[name] = {
            "images_per_s": 1 / seconds_per_image,
            "projected_epoch_s": epoch,
            "speedup_vs_study": STUDY_SECONDS_PER_EPOCH / epoch,
        }
    report["harness_vs_plain"] = report["harness"]["images_per_s"] / report["plain_fp32_nchw"]["images_per_s"]
    return report


def history_summary(run_dir: Path) -> dict | None:
    """Measured epoch times of the run itself, projected to the study's 472-image epoch."""
    path = run_dir / "history.json"
    if not path.is_file():
        return None
    history = json.loads(path.read_text())
    if not history:
        return None
    later = history[1:] or history  # epoch 1 includes decoding into the cache and worker start-up
    rate = statistics.median(h["images_per_s"] for h in later)
    return {
        "epochs": len(history),
        "median_epoch_s": statistics.median(h["seconds"] for h in later),
        "median_images_per_s": rate,
        "projected_epoch_s": STUDY_TRAIN_IMAGES / rate,
        "speedup_vs_study": STUDY_SECONDS_PER_EPOCH / (STUDY_TRAIN_IMAGES / rate),
    }


# ---------------------------------------------------------------------------------------------
# The whole benchmark


def benchmark_run(
    run_dir: Path,
    backends: list[str],
    batch_sizes: list[int],
    iters: int,
    warmup: int,
    train_steps: int,
    data_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Latency, parity and training speed for the run in ``run_dir``; returns the report dict."""
    model, cfg, _ = load_trained_model(run_dir / "checkpoints" / "best.pt")
    models = {p: run_dir / ("model.onnx" if p == "fp32" else f"model_{p}.onnx") for p in ("fp32", "fp16", "int8")}
    train_set, test_set = load_run_datasets(cfg, run_dir, data_dir)
    report: dict = {"run": str(run_dir), "machine": machine_info(), "model": asdict(cfg.model),
                    "image_size": cfg.data.image_size, "backends": {}, "skipped": {}}

    loaded: dict[str, Backend] = {}
    for name in backends:
        try:
            loaded[name] = build_backend(name, model, models)
        except Skipped as reason:
            report["skipped"][name] = str(reason)
            log(f"skipped {name}: {reason}")
    rng = np.random.default_rng(0)
    size = cfg.data.image_size
    for name, backend in loaded.items():
        entry = {"device": backend.device, "provider": backend.provider, "notes": backend.notes, "latency": []}
        for batch_size in batch_sizes:
            batch = rng.normal(size=(batch_size, 3, size, size)).astype(np.float32)
            entry["latency"].append(measure_latency(backend, batch, warmup, iters))
        report["backends"][name] = entry
        log(f"timed {name}")
    report["providers_used"] = sorted({b.provider for b in loaded.values() if b.provider})
    report["parity"] = measure_parity(loaded, test_set, cfg.train.threshold)
    report["flagged"] = [name for name, entry in report["parity"].items() if entry.get("flagged")]
    if train_steps > 0:
        report["training"] = measure_training(cfg, train_set, train_steps, warmup=3)
        log("timed training")
    report["training_history"] = history_summary(run_dir)
    return report


def to_markdown(report: dict) -> str:
    """The report as Markdown tables, with the machine it came from."""
    machine = report["machine"]
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in machine["gpus"]) or "none"
    lines = [
        f"# kvseg benchmark: {report['run']}",
        "",
        f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores; GPU: {gpus}"
        + (f", driver {machine['gpu_driver']}" if machine.get("gpu_driver") else ""),
        f"torch {machine['packages'].get('torch')}, onnxruntime "
        f"{machine['packages'].get('onnxruntime-gpu') or machine['packages'].get('onnxruntime')}; "
        f"providers used: {', '.join(report['providers_used']) or 'none'}",
        f"Model: U-Net base {report['model']['base_channels']}, depth {report['model']['depth']}, "
        f"{report['image_size']}x{report['image_size']}",
        "",
        "## Inference latency",
        "",
        "| backend | batch | median ms | p90 ms | p99 ms | images/s | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, entry in report["backends"].items():
        for row in entry["latency"]:
            notes = "; ".join(entry["notes"])
            if "copy" in row:
                notes += f"; copies H2D {row['copy']['host_to_device_ms']:.2f} ms, D2H {row['copy']['device_to_host_ms']:.2f} ms"
            lines.append(f"| {name} | {row['batch_size']} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | "
                         f"{row['p99_ms']:.2f} | {row['images_per_s']:.1f} | {notes} |")
    if report["skipped"]:
        lines += ["", "Skipped:"] + [f"- {name}: {reason}" for name, reason in report["skipped"].items()]
    lines += ["", "## IoU parity on the test split", "",
              "| backend | IoU per-image | IoU dataset | Dice per-image | Dice dataset "
              "| IoU diff vs torch-fp32 | pixels differing | flag |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, entry in report["parity"].items():
        lines.append(
            f"| {name} | {entry['iou_per_image']:.4f} | {entry['iou_dataset']:.4f} | {entry['dice_per_image']:.4f} | "
            f"{entry['dice_dataset']:.4f} | {entry.get('iou_diff_vs_torch_fp32', 0):+.2e} | "
            f"{entry.get('pixels_differing_vs_torch_fp32', 0):.4%} | {'FLAGGED' if entry.get('flagged') else ''} |"
        )
    training = report.get("training")
    if training:
        lines += ["", "## Training speed against the study's 300 s/epoch", "",
                  f"U-Net base {training['base_channels']}, {training['image_size']}x{training['image_size']}, "
                  f"batch {training['batch_size']}, {training['steps']} timed steps on {training['device']}; "
                  f"harness: {training['mixed_precision']} autocast, channels_last, {training['num_workers']} worker(s), "
                  "cached data; the study's image size and width are not given.", "",
                  "| loop | images/s | projected s per 472-image epoch | speedup vs 300 s |",
                  "| --- | ---: | ---: | ---: |"]
        for key, label in (("plain_fp32_nchw", "plain fp32 NCHW"), ("harness", "kvseg harness")):
            row = training[key]
            lines.append(f"| {label} | {row['images_per_s']:.1f} | {row['projected_epoch_s']:.1f} "
                         f"| {row['speedup_vs_study']:.1f}x |")
        lines.append(f"\nHarness against plain loop: {training['harness_vs_plain']:.2f}x.")
    history = report.get("training_history")
    if history:
        lines.append(
            f"\nMeasured in the run itself ({history['epochs']} epochs): median {history['median_images_per_s']:.1f} "
            f"images/s, {history['median_epoch_s']:.1f} s per epoch; projected {history['projected_epoch_s']:.1f} s "
            f"per 472-image epoch ({history['speedup_vs_study']:.1f}x the study)."
        )
    return "\n".join(lines) + "\n"
