"""Runtime policy: device, precision, threads, DataLoader workers and the record of the machine.

Training and the benchmark take every one of these decisions here, so that a benchmark measures
what a run does. :func:`describe_machine` is the one list of package versions and devices kvseg
records (in a run's ``environment.json`` and in every benchmark report).
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import cv2
import torch

import kvseg
from kvseg.allocator import DONE as ALLOCATOR_ACTIVE

PACKAGES = ("torch", "accelerate", "albumentations", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu",
            "onnxscript", "scikit-learn", "monai", "openvino", "av")


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
    """The precision to train in: ``"no"``, ``"fp16"`` or ``"bf16"``.

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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def cpu_threads_per_process(requested: int) -> int:
    """Torch threads for one of the processes on this machine; ``requested`` > 0 wins.

    ``accelerate launch`` without ``--cpu`` sets OMP_NUM_THREADS=1, which halves CPU training speed
    on a two-core machine; kvseg gives each local process its share of the cores instead.
    """
    if requested > 0:
        return requested
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_num_workers(num_processes: int) -> int:
    """DataLoader workers per process: one fewer than its share of the cores, at least 1, at most 8."""
    return max(1, min(8, usable_cores() // num_processes - 1))


def single_threaded_opencv() -> None:
    """Turn off OpenCV's own thread pool in this process, before DataLoader workers are forked from it.

    Parallelism comes from the workers. A worker forked while the parent's OpenCV pool exists
    inherits it in a broken state, and OpenCV calls in the worker (``cv2.setNumThreads`` among them)
    can then hang forever; this was seen in the benchmark, whose parent resizes images before it
    starts the harness's workers. ``cv2.setNumThreads(0)`` in the parent is the usual remedy.
    """
    cv2.setNumThreads(0)


def worker_ignores_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM and SIGUSR1.

    Schedulers signal every process of a job (SLURM; torchrun signals each training process's whole
    process group), workers included. The training process answers by finishing its step and saving
    (:mod:`kvseg.training.stopping`); a worker that died of the signal instead (PyTorch's worker
    handler lets SIGTERM from anyone but its parent kill it) would fail that step first. Workers
    still end with their parent, on its shutdown or its death.
    """
    for stop in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpu_driver() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    return None


def describe_machine() -> dict:
    """CPU, GPUs, driver, Python, platform, kvseg's package versions and ONNX Runtime's providers."""
    packages = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    gpus = [{"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
            for props in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))]
    import onnxruntime as ort

    return {
        "kvseg": kvseg.__version__,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu_native_bf16": cpu_supports_bf16(),
        "gpus": gpus,
        "gpu_driver": _gpu_driver() if gpus else None,
        "cuda_runtime": torch.version.cuda,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": packages,
        "onnxruntime_providers_listed": ort.get_available_providers(),
        "torch_threads": torch.get_num_threads(),
        "allocator": os.environ.get(ALLOCATOR_ACTIVE, "system default (not chosen by kvseg.allocator)"),
    }
