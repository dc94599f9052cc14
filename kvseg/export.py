"""ONNX export of a trained run: fp32, fp16 and int8 models, verified against PyTorch, self-describing.

Every model takes ``image`` float32 (B, 3, H, W), normalised as in training, and returns ``logits``
float32 (B, 1, H, W). Its metadata properties (``kvseg.*``) hold the image size, normalisation,
threshold, U-Net shape, kvseg version, training config and test metrics, so a deployment needs
only the file: :func:`read_metadata` reads them back.

Verification is on by default and fails closed: a model is written to a temporary name, checked in
ONNX Runtime against the PyTorch model on the run's test images and on random inputs (at another
batch size and image size than the export sample), and only renamed into place when it passes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import kvseg
from kvseg.checkpoint import load_run_datasets, load_trained_model
from kvseg.config import Config
from kvseg.data import SegmentationDataset
from kvseg.errors import CheckpointError, KvsegError
from kvseg.metrics import SegmentationMetrics

DEFAULT_OPSET = 18
FP32_MAX_ABS = 1e-4
FP32_MIN_AGREEMENT = 0.9999
INT8_MAX_IOU_DROP = 0.01


class VerificationError(KvsegError):
    """An exported model does not reproduce the PyTorch model within tolerance."""


@dataclass
class Parity:
    """How one ONNX model's outputs compare with PyTorch fp32 on the same inputs."""

    max_abs_diff: float
    mean_abs_diff: float
    mask_agreement: float  # fraction of pixels with the same predicted class
    iou_torch: float | None = None  # per-image mean IoU on the test images
    iou_onnx: float | None = None

    @property
    def iou_change(self) -> float | None:
        if self.iou_torch is None or self.iou_onnx is None:
            return None
        return self.iou_onnx - self.iou_torch


@dataclass
class ExportedModel:
    precision: str
    path: Path
    size_bytes: int
    parity: Parity | None
    seconds: float


@dataclass
class ExportReport:
    checkpoint: Path
    models: list[ExportedModel] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "models": [
                {**asdict(m), "path": str(m.path), "iou_change": m.parity.iou_change if m.parity else None}
                for m in self.models
            ],
        }


# ---------------------------------------------------------------------------------------------
# Finding what to export


def latest_run(output_dir: str | Path) -> Path:
    """The run folder under ``output_dir`` whose best checkpoint is newest."""
    output_dir = Path(output_dir)
    candidates = sorted(output_dir.glob("*/checkpoints/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(
            f"{output_dir}: no run with checkpoints/best.pt found (train one first, or pass --run / --checkpoint)"
        )
    return candidates[-1].parent.parent


def checkpoint_of(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints/best.pt``, checked to exist."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run folder not found")
    path = run_dir / "checkpoints" / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found (expected a run folder written by train_ddp.py)")
    return path


# ---------------------------------------------------------------------------------------------
# Export


class _HalfPrecision(nn.Module):
    """Runs a model in fp16 behind float32 input and output, for a fp16 ONNX graph with fp32 I/O."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image.half()).float()


@contextlib.contextmanager
def _quiet():
    """torch.onnx's dynamo exporter reports progress on stdout and warns about optional packages."""
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("torch.onnx").setLevel(level)


def _name_dynamic_axes(model: onnx.ModelProto, dynamic_hw: bool) -> None:
    """Give the graph's dynamic axes readable names: batch, height, width."""
    names = ["batch", None, "height", "width"] if dynamic_hw else ["batch", None, None, None]
    for value in [*model.graph.input, *model.graph.output]:
        for dim, name in zip(value.type.tensor_type.shape.dim, names):
            if name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name


def export_model(
    model: nn.Module, path: Path, image_size: int, depth: int, opset: int = DEFAULT_OPSET, dynamic_hw: bool = True
) -> None:
    """Export ``model`` to ``path`` with the dynamo exporter; batch always dynamic, H/W optionally.

    Dynamic height and width are multiples of ``2**depth``, the only sizes the U-Net accepts.
    """
    sample = torch.zeros(1, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    axes: dict[int, object] = {0: batch}
    if dynamic_hw:
        multiple = 2**depth
        axes[2] = multiple * torch.export.Dim("height_blocks", min=1, max=8192 // multiple)
        axes[3] = multiple * torch.export.Dim("width_blocks", min=1, max=8192 // multiple)
    with _quiet():
        program = torch.onnx.export(
            model, (sample,), dynamo=True, input_names=["image"], output_names=["logits"],
            dynamic_shapes=({**axes},), opset_version=opset, verbose=False,
        )
    onnx_model = program.model_proto
    _name_dynamic_axes(onnx_model, dynamic_hw)
    onnx.save(onnx_model, path)


def metadata_for(cfg: Config, payload: dict, precision: str) -> dict[str, str]:
    """The ``kvseg.*`` metadata properties written into every exported model."""
    values = {
        "image_size": cfg.data.image_size,
        "input_multiple": 2**cfg.model.depth,
        "mean": cfg.augment.mean,
        "std": cfg.augment.std,
        "max_pixel_value": 255.0,
        "threshold": cfg.train.threshold,
        "base_channels": cfg.model.base_channels,
        "depth": cfg.model.depth,
        "upsample": cfg.model.upsample,
        "precision": precision,
        "version": kvseg.__version__,
        "epoch": payload.get("epoch"),
        "config": payload["config"],
        "metrics": {k: v for k, v in (payload.get("metrics") or {}).items() if k != "per_image_iou"},
    }
    return {f"kvseg.{key}": json.dumps(value) for key, value in values.items()}


def write_metadata(path: Path, properties: dict[str, str]) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in properties.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = "kvseg U-Net: image (B,3,H,W) float32 normalised -> logits (B,1,H,W); see kvseg.* metadata"
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict:
    """The ``kvseg.*`` metadata of an exported model, decoded (``image_size``, ``mean``, ``config``, ...)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key.removeprefix("kvseg."): json.loads(p.value) for p in model.metadata_props if p.key.startswith("kvseg.")}


def check_model(path: Path) -> None:
    """``onnx.checker`` (full check, with shape inference) on the file at ``path``."""
    onnx.checker.check_model(str(path), full_check=True)


# ---------------------------------------------------------------------------------------------
# Verification


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _iou(logits: list[np.ndarray], masks: list[np.ndarray], threshold: float) -> float:
    metrics = SegmentationMetrics(threshold=threshold)
    for batch, mask in zip(logits, masks):
        metrics.update(torch.from_numpy(batch), torch.from_numpy(mask))
    return metrics.compute()["per_image"]["iou"]


def measure_parity(
    session: ort.InferenceSession,
    model: nn.Module,
    test_batches: list[tuple[np.ndarray, np.ndarray]],
    random_inputs: list[np.ndarray],
    threshold: float,
) -> Parity:
    """Compare ONNX Runtime with PyTorch fp32 on the test batches and the random inputs."""
    logit_threshold = float(np.log(threshold / (1 - threshold)))
    diffs, agree, total = [], 0, 0
    torch_logits, onnx_logits, masks = [], [], []
    inputs = [(images, mask) for images, mask in test_batches] + [(x, None) for x in random_inputs]
    for images, mask in inputs:
        with torch.no_grad():
            expected = model(torch.from_numpy(images)).numpy()
        got = session.run(["logits"], {"image": images})[0]
        diff = np.abs(got.astype(np.float64) - expected)
        diffs.append((diff.max(), diff.sum(), diff.size))
        agree += int(((got > logit_threshold) == (expected > logit_threshold)).sum())
        total += got.size
        if mask is not None:
            torch_logits.append(expected)
            onnx_logits.append(got)
            masks.append(mask)
    parity = Parity(
        max_abs_diff=float(max(d[0] for d in diffs)),
        mean_abs_diff=float(sum(d[1] for d in diffs) / sum(d[2] for d in diffs)),
        mask_agreement=agree / total,
    )
    if masks:
        parity.iou_torch = _iou(torch_logits, masks, threshold)
        parity.iou_onnx = _iou(onnx_logits, masks, threshold)
    return parity


def _batches(dataset: SegmentationDataset, batch_size: int, limit: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(images, masks) numpy batches of the first ``limit`` samples (all by default)."""
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    return [(images.numpy(), masks.numpy()) for images, masks, _ in DataLoader(dataset, batch_size=batch_size)]


# ---------------------------------------------------------------------------------------------
# int8


class _CalibrationReader:
    """Feeds training images to ONNX Runtime's static quantisation, one batch at a time."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"image": batch}

    def rewind(self) -> None:  # part of the CalibrationDataReader interface; one pass is enough here
        return None


def quantize_int8(fp32_path: Path, out_path: Path, calibration: list[np.ndarray]) -> None:
    """Static int8 quantisation in QDQ format (per-channel weights), calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path.with_name(out_path.name + ".pre.onnx")
    try:
        with _quiet():
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared), str(out_path), _CalibrationReader(calibration),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    finally:
        prepared.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The command


def _check_writable(path: Path) -> None:
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise KvsegError(f"{path}: cannot write the model here ({blocking} is a file, not a folder)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(path.name + ".probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise KvsegError(f"{path}: cannot write the model here ({exc.strerror or exc})") from None


def _sibling(path: Path, precision: str) -> Path:
    return path.with_name(f"{path.stem}_{precision}{path.suffix}")


def export_run(
    checkpoint: Path,
    output: Path,
    run_dir: Path | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_hw: bool = True,
    fp16: bool = False,
    int8: bool = False,
    verify: bool = True,
    data_dir: str | None = None,
    calibration_images: int = 64,
    log=print,
) -> ExportReport:
    """Export ``checkpoint`` to ``output`` (plus ``*_fp16.onnx`` / ``*_int8.onnx``) and verify each.

    A model that fails verification is deleted and :class:`VerificationError` names the numbers.
    """
    model, cfg, payload = load_trained_model(checkpoint)
    _check_writable(output)
    size, depth, threshold = cfg.data.image_size, cfg.model.depth, cfg.train.threshold
    report = ExportReport(checkpoint=checkpoint)

    test_batches: list[tuple[np.ndarray, np.ndarray]] = []
    random_inputs: list[np.ndarray] = []
    calibration: list[np.ndarray] = []
    if verify or int8:
        train_set, test_set = load_run_datasets(cfg, run_dir, data_dir)
        test_batches = _batches(test_set, batch_size=3)  # export sample: batch 1
        other = size + 2**depth if dynamic_hw else size
        rng = np.random.default_rng(0)
        random_inputs = [rng.normal(size=(2, 3, other, other)).astype(np.float32),
                         rng.normal(size=(5, 3, size, size)).astype(np.float32)]
        if int8:
            calibration = [images for images, _ in _batches(train_set, batch_size=8, limit=calibration_images)]

    def finish(precision: str, tmp: Path, final: Path, started: float) -> ExportedModel:
        write_metadata(tmp, metadata_for(cfg, payload, precision))
        check_model(tmp)
        parity = None
        if verify:
            parity = measure_parity(_session(tmp), model, test_batches, random_inputs, threshold)
            failure = _failure(precision, parity)
            if failure:
                tmp.unlink(missing_ok=True)
                final.unlink(missing_ok=True)  # never leave an older model that looks verified
                raise VerificationError(f"{final}: {precision} verification failed: {failure}")
        os.replace(tmp, final)
        exported = ExportedModel(precision, final, final.stat().st_size, parity, time.perf_counter() - started)
        report.models.append(exported)
        log(_describe(exported))
        return exported

    started = time.perf_counter()
    tmp = output.with_name(output.name + ".tmp")
    try:
        export_model(model, tmp, size, depth, opset, dynamic_hw)
        finish("fp32", tmp, output, started)
        if fp16:
            started = time.perf_counter()
            final = _sibling(output, "fp16")
            tmp = final.with_name(final.name + ".tmp")
            export_model(_HalfPrecision(model), tmp, size, depth, opset, dynamic_hw)
            finish("fp16", tmp, final, started)
        if int8:
            started = time.perf_counter()
            final = _sibling(output, "int8")
            tmp = final.with_name(final.name + ".tmp")
            quantize_int8(output, tmp, calibration)
            finish("int8", tmp, final, started)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def _failure(precision: str, parity: Parity) -> str | None:
    """Why ``parity`` fails the tolerance of ``precision``, or None."""
    if precision == "fp32":
        if parity.max_abs_diff > FP32_MAX_ABS or parity.mask_agreement < FP32_MIN_AGREEMENT:
            return (f"max |logit diff| {parity.max_abs_diff:.3g} (limit {FP32_MAX_ABS:g}), identical masks on "
                    f"{parity.mask_agreement:.4%} of pixels (limit {FP32_MIN_AGREEMENT:.2%})")
    if precision == "int8" and parity.iou_change is not None and parity.iou_change < -INT8_MAX_IOU_DROP:
        return (f"test IoU {parity.iou_onnx:.4f} against {parity.iou_torch:.4f} in PyTorch fp32 "
                f"(drop {-parity.iou_change:.4f}, limit {INT8_MAX_IOU_DROP})")
    return None


def _describe(exported: ExportedModel) -> str:
    line = f"wrote {exported.path} ({exported.precision}, {exported.size_bytes / 1e6:.2f} MB, {exported.seconds:.1f} s)"
    parity = exported.parity
    if parity is None:
        return line + ", NOT verified"
    line += (f"; vs PyTorch fp32: max |diff| {parity.max_abs_diff:.2e}, mean |diff| {parity.mean_abs_diff:.2e}, "
             f"same class on {parity.mask_agreement:.4%} of pixels")
    if parity.iou_change is not None:
        line += f", test IoU {parity.iou_onnx:.4f} ({parity.iou_change:+.4f})"
    return line
