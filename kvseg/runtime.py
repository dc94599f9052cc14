"""Runtime policy: device, precision, threads, DataLoader workers and the record of the machine.

Training and the benchmark take every one of these decisions here, so that a benchmark measures
what a run does. :func:`describe_machine` is the one list of package versions and devices kvseg
records (in a run's ``environment.json`` and in every benchmark report).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing.util  # its exit handler must be registered before ours (atexit runs handlers last in, first out)
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


def gpu_supports_bf16() -> bool:
    """True when a CUDA GPU runs bf16 natively (Ampere or later); emulated bf16 does not count."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before 2.3 has no including_emulation and does not emulate
        return bool(torch.cuda.is_bf16_supported())


def resolve_mixed_precision(requested: str) -> str:
    """The precision to train in: ``"no"``, ``"fp16"`` or ``"bf16"``.

    ``auto`` keeps what ``accelerate launch`` was told (``ACCELERATE_MIXED_PRECISION``; torchrun and
    plain ``python`` tell nothing, read as ``no``), except that a launcher value of ``no`` becomes
    ``bf16`` where bf16 is native: on a CUDA GPU of Ampere or later (as ``configs/accelerate/gpu_*.yaml``
    ask), and on a CPU-only machine with AVX512-BF16 or AMX, where it is several times faster. Any
    explicit value is used as it is (``--mixed-precision no`` trains in fp32 anywhere).
    """
    if requested != "auto":
        return requested
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no":
        return launcher
    if no_accelerator():
        return "bf16" if cpu_supports_bf16() else "no"
    return "bf16" if gpu_supports_bf16() else "no"


def configure_gpu_math(device: torch.device) -> dict:
    """On a CUDA device: cuDNN autotuning (``cudnn.benchmark``) and TF32 for the fp32 matmuls and convolutions.

    The U-Net sees one input shape per run, so the autotuner's first-step search pays back; TF32
    keeps fp32's range with a 10-bit mantissa, the parts that autocast leaves in fp32 run on the
    tensor cores. Nothing changes on other devices. Returns :func:`gpu_math`, as recorded in a
    run's ``environment.json``.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch 2.9 and later
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    return gpu_math()


def gpu_math() -> dict:
    """Whether cuDNN autotunes (``cudnn_benchmark``) and whether fp32 matmuls and convolutions may use TF32."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        matmul = torch.backends.cuda.matmul.fp32_precision == "tf32"
        conv = torch.backends.cudnn.conv.fp32_precision == "tf32"
    else:
        matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    return {"cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "tf32_matmul": bool(matmul), "tf32_conv": bool(conv)}


def resolve_augment_on(requested: str, device: torch.device, workers_only: bool = False) -> str:
    """Where training augments (``data.augment_on``): ``workers`` or ``device``; ``auto`` is ``device`` on a GPU.

    On a GPU the DataLoader workers then only read the cache and ship uint8, and the batch is
    rotated, flipped and normalised there (:mod:`kvseg.data.device_augment`); on the CPU the workers
    are the parallelism, so they augment. ``workers_only``: augmentations the device path does not have
    are on (``AugmentConfig.workers_only``), so ``auto`` keeps them in the workers.
    """
    if requested != "auto":
        return requested
    return "device" if device.type == "cuda" and not workers_only else "workers"


OPENMP_BINDING = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")
CGROUP_CPUSETS = ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/fs/cgroup/cpuset/cpuset.effective_cpus")


def _cpu_list(text: str) -> set[int]:
    """``0-3,6`` -> {0, 1, 2, 3, 6} (the kernel's CPU list format)."""
    cores: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        low, _, high = part.partition("-")
        cores.update(range(int(low), int(high or low) + 1))
    return cores


def process_cores() -> set[int]:
    """The CPU cores this process may run on, whatever an OpenMP binding did to the main thread.

    The affinity read when kvseg was imported (:data:`kvseg.START_AFFINITY`, before torch pinned the
    main thread); else, under an OpenMP binding variable, the container's cpuset (cgroup v2 or v1), or
    every core; else the main thread's affinity mask.
    """
    if kvseg.START_AFFINITY:
        return set(kvseg.START_AFFINITY)
    bound = any(os.environ.get(name) for name in OPENMP_BINDING)
    if hasattr(os, "sched_getaffinity") and not bound:
        return set(os.sched_getaffinity(0))
    for path in CGROUP_CPUSETS:
        with contextlib.suppress(OSError, ValueError):
            cores = _cpu_list(Path(path).read_text())
            if cores:
                return cores
    return set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """How many CPU cores this process may run on (:func:`process_cores`), at least 1.

    An OpenMP binding (``OMP_PROC_BIND=close OMP_PLACES=cores``) pins the main thread to one core when
    torch starts; reading the main thread's mask then gave one core, and training ran on one thread
    (0.54x on a 2-core machine). The binding no longer changes the count.
    """
    return max(1, len(process_cores()))


def unpin_worker(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of the DataLoaders: a worker forked from a pinned main thread runs on every usable core."""
    if hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, process_cores())


def local_processes() -> int:
    """Training processes on this machine: ``LOCAL_WORLD_SIZE`` as torchrun (and accelerate through it) sets it; 1 when unset."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return max(1, int(value)) if value.isdigit() else 1


def cpu_threads_per_process(requested: int) -> int:
    """Torch threads for one of the processes on this machine; ``requested`` > 0 wins.

    ``accelerate launch`` without ``--cpu`` sets OMP_NUM_THREADS=1, which halves CPU training speed
    on a two-core machine; kvseg gives each local process its share of the cores instead.
    """
    if requested > 0:
        return requested
    return max(1, usable_cores() // local_processes())


def default_num_workers(processes: int | None = None) -> int:
    """DataLoader workers per process: one fewer than its share of this machine's cores, at least 1, at most 8.

    The share is of the processes on this machine (``processes``, default :func:`local_processes`),
    not of all machines': two 8-GPU machines of 64 cores give each process 7 workers, as one does.
    """
    return max(1, min(8, usable_cores() // (processes or local_processes()) - 1))


def single_threaded_opencv() -> None:
    """Turn off OpenCV's own thread pool in this process, before DataLoader workers are forked from it.

    Parallelism comes from the workers. A worker forked while the parent's OpenCV pool exists
    inherits it in a broken state, and OpenCV calls in the worker (``cv2.setNumThreads`` among them)
    can then hang forever; this was seen in the benchmark, whose parent resizes images before it
    starts the harness's workers. ``cv2.setNumThreads(0)`` in the parent is the usual remedy.
    """
    cv2.setNumThreads(0)


def init_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the DataLoaders: :func:`unpin_worker`, then :func:`worker_ignores_stop_signals`."""
    unpin_worker(worker_id)
    worker_ignores_stop_signals(worker_id)


def worker_ignores_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader worker ignores SIGTERM and SIGUSR1 (part of :func:`init_worker`).

    Schedulers signal every process of a job (SLURM; torchrun signals each training process's whole
    process group), workers included. The training process answers by finishing its step and saving
    (:mod:`kvseg.training.stopping`); a worker that died of the signal instead (PyTorch's worker
    handler lets SIGTERM from anyone but its parent kill it) would fail that step first. Workers
    still end with their parent, on its shutdown or its death.
    """
    for stop in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(stop, signal.SIG_IGN)


def end_workers_at_exit() -> None:
    """At interpreter exit, kill the DataLoader workers still alive (once registered, for every later exit).

    Workers ignore SIGTERM (:func:`worker_ignores_stop_signals`), and multiprocessing's own exit
    handler ends daemonic children with SIGTERM and then joins them: a worker of a persistent
    loader whose iterator outlived the run (PyTorch 2.7 keeps it until the interpreter's end) would
    keep the finished process waiting forever. This handler runs first: it puts back the default
    SIGCHLD action (PyTorch's handler would report the workers' end as a failure) and sends SIGKILL;
    a worker only reads frames, so nothing is lost.
    """
    global _EXIT_HANDLER
    if not _EXIT_HANDLER:
        atexit.register(_kill_workers)
        _EXIT_HANDLER = True


_EXIT_HANDLER = False


def _kill_workers() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


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
