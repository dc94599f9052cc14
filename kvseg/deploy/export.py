"""Export a trained run to fp32, fp16 and int8 ONNX models, each verified against PyTorch before it is kept.

Verification is on by default and fails closed: a model is written to a temporary name, run in ONNX
Runtime on the run's validation images and on random inputs (at another batch size and image size than
the export sample), scored by :func:`kvseg.evaluation.evaluate.evaluate` against the PyTorch fp32 model, and
renamed into place only when it meets its precision's rule in :func:`rules`. The test split is scored
once, by training; export takes no decision on it. Only a run without a validation split is verified on
its test split, and the report says so. int8 is calibrated on a seeded sample of the training split.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from kvseg.config import Config
from kvseg.deploy.backends import onnx_logits, onnx_session
from kvseg.deploy.onnx_model import (
    DEFAULT_OPSET,
    HalfPrecision,
    check_model,
    export_model,
    metadata_for,
    write_metadata,
)
from kvseg.deploy.quantize import quantize_int8
from kvseg.errors import KvsegError
from kvseg.evaluation.datasets import eval_datasets
from kvseg.evaluation.evaluate import Agreement, EvalResult, evaluate, torch_logits
from kvseg.files import replacing
from kvseg.runs.checkpoint import load_trained_model, threshold_of
from kvseg.runs.folder import RunDir, blocking_file, precision_path

logger = logging.getLogger(__name__)

# fp32 ONNX Runtime and PyTorch differ by summation order only, an error that grows with the values
# summed: the limit is per unit of the largest |logit| of the reference (at least 1). Measured: a base-16
# U-Net at 256 px with logits up to ~10 differed by 1.0e-4, which an absolute 1e-4 refused.
FP32_MAX_ABS = 1e-4
FP32_MIN_SAME_CLASS = 0.9999
FP16_MIN_SAME_CLASS = 0.999  # fp16 rounds logits near the threshold to the other side on a few pixels
FP16_MAX_IOU_DROP = 0.005
INT8_MAX_IOU_DROP = 0.01


class VerificationError(KvsegError):
    """An exported model does not reproduce the PyTorch model within its precision's rule."""


@dataclass
class ExportedModel:
    """One written model and how it compared with PyTorch fp32 (None when not verified)."""

    precision: str
    path: Path
    size_bytes: int
    seconds: float
    rule: str
    agreement: Agreement | None = None  # verification images and random inputs together
    iou: float | None = None  # per-image IoU on the verification split in ONNX Runtime
    iou_reference: float | None = None  # the same in PyTorch fp32
    verified_on: str | None = None  # "validation", or "test (the run has no validation split)"

    @property
    def iou_change(self) -> float | None:
        return None if self.iou is None or self.iou_reference is None else self.iou - self.iou_reference

    def describe(self) -> str:
        line = f"wrote {self.path} ({self.precision}, {self.size_bytes / 1e6:.2f} MB, {self.seconds:.1f} s)"
        if self.agreement is None:
            return line + ", NOT verified"
        a = self.agreement
        return (line + f"; vs PyTorch fp32: max |diff| {a.max_abs_diff:.2e}, mean |diff| {a.mean_abs_diff:.2e}, "
                f"same class on {a.same_class:.4%} of pixels, {self.verified_on} IoU {self.iou:.4f} "
                f"({self.iou_change:+.4f})")


@dataclass
class ExportReport:
    """Every written model, the split each was verified on and the training images int8 was calibrated on."""

    checkpoint: Path
    models: list[ExportedModel] = field(default_factory=list)
    verification_split: str | None = None  # "validation", or "test (the run has no validation split)"
    calibration: dict | None = None  # int8: {"split": "train", "seed", "images", "ids"}

    def to_json(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "verification_split": self.verification_split,
                "calibration": self.calibration,
                "models": [{**asdict(m), "path": str(m.path), "iou_change": m.iou_change} for m in self.models]}


@dataclass(frozen=True)
class Rule:
    """What a model of one precision must reach against PyTorch fp32 to be kept."""

    max_abs_diff: float | None = None
    min_same_class: float | None = None
    max_iou_drop: float | None = None

    def describe(self, split: str = "validation") -> str:
        parts = [f"max |logit diff| <= {self.max_abs_diff:g} x max(1, largest |logit|)" if self.max_abs_diff is not None
                 else "",
                 f"same class on >= {self.min_same_class:.2%} of pixels" if self.min_same_class is not None else "",
                 f"{split.split()[0]} IoU drop <= {self.max_iou_drop:g}" if self.max_iou_drop is not None else ""]
        return ", ".join(p for p in parts if p)

    def failure(self, exported: ExportedModel) -> str | None:
        """Why ``exported`` breaks the rule, naming the numbers; None when it passes."""
        a, problems = exported.agreement, []
        scale = max(1.0, a.max_abs_reference)
        if self.max_abs_diff is not None and a.max_abs_diff > self.max_abs_diff * scale:
            problems.append(f"max |logit diff| {a.max_abs_diff:.2e} (limit {self.max_abs_diff:g} x {scale:.3g}, "
                            "the largest |logit|)")
        if self.min_same_class is not None and a.same_class < self.min_same_class:
            problems.append(f"same class on {a.same_class:.4%} of pixels (limit {self.min_same_class:.2%})")
        if self.max_iou_drop is not None and -exported.iou_change > self.max_iou_drop:
            problems.append(f"{exported.verified_on} IoU {exported.iou:.4f} against {exported.iou_reference:.4f} "
                            "in PyTorch fp32 "
                            f"(drop {-exported.iou_change:.4f}, limit {self.max_iou_drop:g})")
        return ", ".join(problems) or None


def rules() -> dict[str, Rule]:
    """The verification rule of each precision (read at call time, so a test can tighten a limit)."""
    return {
        "fp32": Rule(max_abs_diff=FP32_MAX_ABS, min_same_class=FP32_MIN_SAME_CLASS),
        "fp16": Rule(min_same_class=FP16_MIN_SAME_CLASS, max_iou_drop=FP16_MAX_IOU_DROP),
        "int8": Rule(max_iou_drop=INT8_MAX_IOU_DROP),
    }


def check_writable(path: Path) -> None:
    """Make ``path``'s folder and prove a file can be written there, before minutes of export."""
    blocking = blocking_file(path)
    if blocking is not None:
        raise KvsegError(f"{path}: cannot write the model here ({blocking} is a file, not a folder)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(path.name + ".probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise KvsegError(f"{path}: cannot write the model here ({exc.strerror or exc})") from None


def random_agreement(logits_fn, reference, cfg: Config, threshold: float, dynamic_hw: bool, multiple: int) -> Agreement:
    """Agreement on random inputs at other batch sizes (3, 5) and, with dynamic sides, another size
    (one ``multiple``, the model's input multiple, larger)."""
    size = cfg.data.image_size
    other = size + multiple if dynamic_hw else size
    rng = np.random.default_rng(0)
    agreement = Agreement()
    for shape in ((3, 3, other, other), (5, 3, size, size)):
        images = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
        agreement.update(logits_fn(images), reference(images), threshold)
    return agreement


def export_run(
    checkpoint: Path,
    output: Path,
    run_dir: Path | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_hw: bool = True,
    precisions: tuple[str, ...] = ("fp32",),
    verify: bool = True,
    data_dir: str | None = None,
    calibration_images: int = 64,
    calibration_seed: int = 0,
) -> ExportReport:
    """Export ``checkpoint`` to ``output`` (fp32) and its siblings for the other ``precisions``; verify each.

    fp32 is always written first (int8 is quantised from it, calibrated on ``calibration_images``
    training images drawn by ``calibration_seed``). Verification runs on the validation split, or on
    the test split of a run that has none (said in the report and every line).

    Raises:
        VerificationError: a model breaks its rule; it is deleted (and any older file at its path),
            so nothing that looks verified stays behind.
        ExportError: the opset cannot be honoured.
        KvsegError: the output cannot be written; checkpoint or data errors.
    """
    model, cfg, payload = load_trained_model(checkpoint)
    check_writable(output)
    report = ExportReport(checkpoint=checkpoint)
    reference = torch_logits(model)
    datasets = eval_datasets(cfg, RunDir(run_dir) if run_dir else None, data_dir) if verify or "int8" in precisions else {}
    if verify:
        report.verification_split, verification_set = verification_split(datasets)
    loader = DataLoader(verification_set, batch_size=3) if verify else None  # export sample: batch 2
    threshold = threshold_of(payload)
    reference_result = evaluate(reference, loader, threshold) if verify else None
    multiple = model.input_multiple
    if "int8" in precisions:
        calibration, report.calibration = calibration_sample(datasets["train"], calibration_images, calibration_seed)
    build = {
        "fp32": lambda tmp: export_model(model, tmp, cfg.data.image_size, multiple, opset, dynamic_hw),
        "fp16": lambda tmp: export_model(HalfPrecision(model), tmp, cfg.data.image_size, multiple, opset, dynamic_hw),
        "int8": lambda tmp: quantize_int8(output, tmp, calibration),
    }
    for precision in ("fp32", *(p for p in ("fp16", "int8") if p in precisions)):
        final = precision_path(output, precision)
        started = time.perf_counter()
        try:
            with replacing(final) as tmp:  # renamed into place only once verified
                build[precision](tmp)
                write_metadata(tmp, metadata_for(cfg, payload, precision, opset))
                check_model(tmp)
                exported = ExportedModel(precision, final, tmp.stat().st_size, 0.0,
                                         rules()[precision].describe(report.verification_split or "validation"),
                                         verified_on=report.verification_split)
                if verify:
                    _verify(exported, onnx_logits(onnx_session(tmp)), reference, reference_result, loader, cfg,
                            threshold, dynamic_hw, multiple)
        except VerificationError:
            final.unlink(missing_ok=True)  # never leave an older model that looks verified
            raise
        exported.seconds = time.perf_counter() - started
        report.models.append(exported)
        logger.info(exported.describe())
    return report


def _verify(exported: ExportedModel, logits_fn, reference, reference_result: EvalResult, loader: DataLoader,
            cfg: Config, threshold: float, dynamic_hw: bool, multiple: int) -> None:
    result = evaluate(logits_fn, loader, threshold, reference=reference)
    exported.agreement = result.agreement.merged(random_agreement(logits_fn, reference, cfg, threshold, dynamic_hw,
                                                                  multiple))
    exported.iou, exported.iou_reference = result.per_image.iou, reference_result.per_image.iou
    failure = rules()[exported.precision].failure(exported)
    if failure:
        raise VerificationError(f"{exported.path}: {exported.precision} verification failed: {failure}")


def verification_split(datasets: dict) -> tuple[str, object]:
    """The split export verifies on: validation, or test (labelled so) for a run without a validation split."""
    if "val" in datasets and len(datasets["val"]):
        return "validation", datasets["val"]
    return "test (the run has no validation split)", datasets["test"]


def calibration_sample(train_set, limit: int, seed: int) -> tuple[list[np.ndarray], dict]:
    """Batches of 8 of ``limit`` training images (eval pipeline) drawn by ``seed``, for int8 calibration,
    and what was drawn (split, seed, count, ids in drawn order)."""
    rng = np.random.default_rng(seed)
    indices = [int(i) for i in rng.permutation(len(train_set))[:min(limit, len(train_set))]]
    batches = [images.numpy() for images, _, _ in DataLoader(Subset(train_set, indices), batch_size=8)]
    return batches, {"split": "train", "seed": seed, "images": len(indices),
                     "ids": [train_set.samples[i].id for i in indices]}
