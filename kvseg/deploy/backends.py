"""Inference backends: the same model run by PyTorch, ONNX Runtime or OpenVINO, each as a logits function.

Every backend is a :class:`~kvseg.evaluation.evaluate.LogitsFn` (so :func:`kvseg.evaluation.evaluate.evaluate` scores it)
plus what the benchmark needs to time it:

* ``torch-fp32``: PyTorch eager, fp32, NCHW.
* ``torch-fast``: the device's fast path: channels_last with bf16 autocast on a CPU with native bf16
  (fp32 otherwise); on a GPU channels_last, fp16 autocast and ``torch.compile`` when it works.
* ``ort-fp32``: ONNX Runtime, CPU provider, all graph optimisations, one thread per usable core.
* ``ort-int8``: the static-int8 QDQ model on the CPU provider.
* ``ort-cuda-fp32`` / ``ort-cuda-fp16``: CUDA provider with I/O binding, so host/device copies are
  outside the timed region (their cost is reported separately).
* ``ort-tensorrt``: TensorRT provider (fp16), when it loads.
* ``ov-fp32`` / ``ov-bf16``: OpenVINO's CPU plugin on the same ``model.onnx``, with fp32 or bf16
  inference precision (bf16 only on a CPU that OpenVINO lists as bf16-capable); ``ov-int8``: OpenVINO
  on the QDQ ``model_int8.onnx``. Optional: ``pip install -e ".[openvino]"``.

A provider that ONNX Runtime lists but cannot load (no CUDA libraries, wrong cuDNN) raises
:class:`Skipped` with a one-line reason — it is never run on the CPU under its name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from kvseg.allocator import preloaded_malloc
from kvseg.evaluation.evaluate import LogitsFn, torch_logits
from kvseg.runtime import cpu_supports_bf16, usable_cores

BACKENDS = ("torch-fp32", "torch-fast", "ort-fp32", "ort-int8", "ov-fp32", "ov-bf16", "ov-int8", "ort-cuda-fp32",
            "ort-cuda-fp16", "ort-tensorrt")
# The exported model (its precision) that each ONNX backend reads.
MODEL_PRECISION = {"ort-fp32": "fp32", "ort-int8": "int8", "ov-fp32": "fp32", "ov-bf16": "fp32", "ov-int8": "int8",
                   "ort-cuda-fp32": "fp32", "ort-cuda-fp16": "fp16", "ort-tensorrt": "fp32"}


class Skipped(Exception):
    """A backend that cannot run on this machine; the message says why, in one line."""


@dataclass
class Backend:
    """One way of running the model: its logits function and how to time it."""

    name: str
    logits: LogitsFn  # host tensor in, host float32 logits out (for parity)
    timed: Callable[[np.ndarray], Callable[[], object]]  # prepares a batch, returns the call to time
    device: str
    provider: str | None = None
    notes: list[str] = field(default_factory=list)
    copy_seconds: Callable[[np.ndarray], dict] | None = None

    def synchronize(self) -> None:
        """Wait for queued GPU work, so that a clock read after it is honest."""
        if self.device == "cuda":
            torch.cuda.synchronize()


def onnx_session(path: str | Path, providers: list | None = None, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session with all graph optimisations; CPU provider unless ``providers`` says otherwise."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def host_batch(images: torch.Tensor) -> np.ndarray:
    """A (B, 3, H, W) tensor as the contiguous float32 NumPy array an ONNX runtime takes."""
    return np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)


def onnx_logits(session: ort.InferenceSession) -> LogitsFn:
    """The logits function of an exported model (input ``image``, output ``logits``)."""

    def logits(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"image": host_batch(images)})[0])

    return logits


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
    forward: nn.Module | Callable = model
    if fast and device == "cuda":
        try:
            compiled = torch.compile(model)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                compiled(torch.zeros(1, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last))
            forward = compiled
            notes.append("torch.compile")
        except Exception as exc:  # compile support varies by platform; eager still works
            notes.append(f"torch.compile unavailable ({type(exc).__name__})")

    eager = torch_logits(forward, channels_last=fast)

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            return eager(x)

    def logits(images: torch.Tensor) -> torch.Tensor:
        return call(images.to(device)).cpu()

    def timed(images: np.ndarray) -> Callable[[], object]:
        x = torch.from_numpy(images).to(device)
        return lambda: call(x)

    return Backend("torch-fast" if fast else "torch-fp32", logits, timed, device, notes=notes)


def _load_provider(path: Path, provider: str, options: dict | None = None) -> ort.InferenceSession:
    """A session that really runs on ``provider``, or :class:`Skipped` with the reason."""
    if provider not in ort.get_available_providers():
        raise Skipped(f"{provider} is not in this onnxruntime build")
    previous = ort.get_default_logger_severity() if hasattr(ort, "get_default_logger_severity") else 2
    ort.set_default_logger_severity(4)  # a provider that fails to load is reported by kvseg in one line
    try:
        session = onnx_session(path, [(provider, options or {}), "CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types per provider
        raise Skipped(f"{provider} failed to load: {str(exc).strip().splitlines()[0][:160]}") from None
    finally:
        ort.set_default_logger_severity(previous)
    if session.get_providers()[0] != provider:
        raise Skipped(f"{provider} is listed but does not load here (no GPU or its libraries)")
    return session


def ort_cpu_backend(name: str, path: Path, threads: int | None = None) -> Backend:
    """An exported model on ONNX Runtime's CPU provider, ``threads`` threads (default: one per usable core)."""
    if not path.is_file():
        raise Skipped(f"{path} not found")
    threads = threads or usable_cores()
    session = onnx_session(path, threads=threads)
    return Backend(name, onnx_logits(session), lambda images: lambda: session.run(["logits"], {"image": images}),
                   "cpu", "CPUExecutionProvider", notes=[f"{threads} threads, ORT_ENABLE_ALL"])


def ort_gpu_backend(name: str, path: Path, provider: str, options: dict | None = None) -> Backend:
    """CUDA or TensorRT provider with I/O binding: inputs and outputs stay on the GPU while timed."""
    if not path.is_file():
        raise Skipped(f"{path} not found")
    session = _load_provider(path, provider, options)

    def bound(value: ort.OrtValue) -> ort.IOBinding:
        binding = session.io_binding()
        binding.bind_ortvalue_input("image", value)
        binding.bind_output("logits", "cuda", 0)
        session.run_with_iobinding(binding)
        return binding

    def timed(images: np.ndarray) -> Callable[[], object]:
        binding = bound(ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0))
        return lambda: session.run_with_iobinding(binding)

    def copy_seconds(images: np.ndarray) -> dict:
        start = time.perf_counter()
        value = ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0)
        host_to_device = time.perf_counter() - start
        binding = bound(value)
        start = time.perf_counter()
        binding.copy_outputs_to_cpu()
        return {"host_to_device_ms": host_to_device * 1e3, "device_to_host_ms": (time.perf_counter() - start) * 1e3}

    return Backend(name, onnx_logits(session), timed, "cuda", provider, notes=["I/O binding"], copy_seconds=copy_seconds)


def openvino_backend(name: str, path: Path, precision: str, threads: int | None = None) -> Backend:
    """An exported model on OpenVINO's CPU plugin, latency mode, ``threads`` threads (default: one per usable core).

    ``precision`` is OpenVINO's inference precision hint, ``"f32"`` or ``"bf16"`` (for a QDQ int8
    model ``"f32"``: its quantised layers run in int8 either way).

    Raises:
        Skipped: OpenVINO is not installed, the file is missing, bf16 is asked of a CPU without it, or
            a replacement malloc is preloaded (it crashes OpenVINO; see :mod:`kvseg.allocator`).
    """
    preloaded = preloaded_malloc()
    if preloaded:
        raise Skipped(f"OpenVINO crashes with {Path(preloaded).name} preloaded (openvinotoolkit/openvino#28551); "
                      "run with KVSEG_ALLOCATOR=glibc and without it in LD_PRELOAD")
    try:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints
    except ImportError:
        raise Skipped('OpenVINO is not installed (pip install -e ".[openvino]")') from None
    if not path.is_file():
        raise Skipped(f"{path} not found")
    core = ov.Core()
    capabilities = core.get_property("CPU", props.device.capabilities)
    if precision == "bf16" and "BF16" not in capabilities:
        raise Skipped(f"OpenVINO lists no bf16 on this CPU (capabilities: {', '.join(capabilities)})")
    threads = threads or usable_cores()
    compiled = core.compile_model(str(path), "CPU", {
        hints.inference_precision: ov.Type.bf16 if precision == "bf16" else ov.Type.f32,
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        props.inference_num_threads: threads,
    })
    request = compiled.create_infer_request()
    output = compiled.output("logits")

    def run(batch: np.ndarray) -> np.ndarray:
        return request.infer({"image": batch})[output]

    def logits(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.array(run(host_batch(images)), dtype=np.float32))

    return Backend(name, logits, lambda images: lambda: run(images), "cpu", f"OpenVINO {ov.__version__} CPU",
                   notes=[f"{threads} threads, inference precision {precision}, LATENCY hint"])


def build_backend(name: str, model: nn.Module, models: Callable[[str], Path], threads: int | None = None) -> Backend:
    """The backend called ``name``; ``models(precision)`` gives the ONNX file of a precision.

    ``threads`` sets the CPU threads of the ONNX Runtime and OpenVINO CPU backends (default: one per
    usable core); PyTorch's are ``torch.set_num_threads``'s.

    Raises:
        Skipped: it cannot run here.
        ValueError: an unknown name.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("torch-fp32", "torch-fast"):
        return torch_backend(model, fast=name == "torch-fast", device=device)
    if name in ("ort-fp32", "ort-int8"):
        return ort_cpu_backend(name, models(MODEL_PRECISION[name]), threads)
    if name in ("ov-fp32", "ov-bf16", "ov-int8"):
        return openvino_backend(name, models(MODEL_PRECISION[name]), "bf16" if name == "ov-bf16" else "f32", threads)
    if name in ("ort-cuda-fp32", "ort-cuda-fp16"):
        return ort_gpu_backend(name, models(MODEL_PRECISION[name]), "CUDAExecutionProvider")
    if name == "ort-tensorrt":
        path = models(MODEL_PRECISION[name])
        options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                   "trt_engine_cache_path": str(path.parent / "trt_cache")}
        return ort_gpu_backend(name, path, "TensorrtExecutionProvider", options)
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
