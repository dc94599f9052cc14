"""Segmenting images with a trained model: :class:`Predictor` (from a run or an ONNX file) and :func:`predict_files`.

A predictor prepares an image exactly as evaluation prepares a test image, runs a logits function
(PyTorch, ONNX Runtime or OpenVINO) and maps the probabilities back to the image's own size; the
command line is :mod:`kvseg.commands.predict`, and video frames go through the same predictor
(:mod:`kvseg.video.segment`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from rich.progress import track

from kvseg.config import AugmentConfig
from kvseg.data.augment import build_eval_transform
from kvseg.data.folder import COMMON_EXTENSIONS, IMAGE_EXTENSIONS, read_image, resize_image
from kvseg.deploy.backends import Skipped, onnx_logits, onnx_session, openvino_backend
from kvseg.deploy.onnx_model import read_metadata
from kvseg.errors import CheckpointError, ImageTooLargeError, KvsegError
from kvseg.evaluation.evaluate import LogitsFn, torch_logits
from kvseg.evaluation.overlay import overlay
from kvseg.evaluation.tta import ALL_TRANSFORMS, with_tta
from kvseg.files import write_png
from kvseg.runs.checkpoint import threshold_of
from kvseg.runs.folder import RunDir


@dataclass
class Predictor:
    """A logits function and how to prepare its input: resize to ``image_size``, the eval pipeline's normalisation."""

    logits: LogitsFn
    image_size: int
    transform: A.Compose
    threshold: float

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> normalised float32 (3, S, S), exactly as evaluation prepares a test image."""
        resized = resize_image(image, self.image_size)
        return self.transform(image=resized)["image"]

    def probabilities(self, images: list[np.ndarray], tta: bool = False) -> np.ndarray:
        """Instrument probabilities (N, S, S) float32 of RGB uint8 images, at the model's size."""
        logits_fn = with_tta(self.logits, ALL_TRANSFORMS) if tta else self.logits
        logits = logits_fn(torch.stack([self.prepare(image) for image in images]))
        return torch.sigmoid(logits.float())[:, 0].numpy()

    def mask_at(self, probability: np.ndarray, height: int, width: int) -> np.ndarray:
        """Boolean (height, width) mask of one (S, S) probability map: resized linearly, then thresholded."""
        return cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR) > self.threshold


def torch_predictor(run_dir: str | Path) -> Predictor:
    """The selected (best) checkpoint of a run, in fp32 on the CPU."""
    model, cfg, payload = RunDir(run_dir).load_model()
    return Predictor(torch_logits(model), cfg.data.image_size, build_eval_transform(cfg.augment), threshold_of(payload))


def onnx_predictor(path: str | Path, runtime: str = "onnxruntime") -> Predictor:
    """An exported model, set up from its ``kvseg.*`` metadata alone, run by ONNX Runtime (CPU provider)
    or by OpenVINO's CPU plugin (``runtime="openvino"``, fp32 inference precision; int8 for a QDQ model).

    Raises:
        CheckpointError: the file is missing, unreadable or has no kvseg metadata.
        KvsegError: ``runtime="openvino"`` and OpenVINO is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX model not found")
    try:
        meta = read_metadata(path)
        logits = openvino_backend("openvino", path, "f32").logits if runtime == "openvino" else onnx_logits(onnx_session(path))
    except Skipped as reason:  # OpenVINO not installed
        raise KvsegError(f"--runtime openvino: {reason}") from None
    except Exception as exc:  # onnx, onnxruntime and openvino raise their own types for a damaged file
        raise CheckpointError(f"{path}: cannot load the ONNX model ({str(exc).splitlines()[0][:160]})") from None
    missing = [key for key in ("image_size", "mean", "std", "threshold") if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: no kvseg metadata ({', '.join(missing)}); expected a model written by export.py")
    transform = build_eval_transform(AugmentConfig(mean=list(meta["mean"]), std=list(meta["std"])))
    return Predictor(logits, int(meta["image_size"]), transform, float(meta["threshold"]))


def collect_inputs(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Image files named directly or found in named folders; and the paths that are neither."""
    files, problems = [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
            if not found:
                problems.append(f"{path} (a folder with no images: expected {', '.join(COMMON_EXTENSIONS)} ... files)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path} (not found)")
    return files, problems


def predict_files(
    predictor: Predictor, files: Sequence[Path], out_dir: Path, tta: bool = False, batch_size: int = 8
) -> tuple[list[Path], list[str]]:
    """Masks and overlays of ``files`` in ``out_dir``; returns written files and unreadable inputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, problems, used_names = [], [], set()
    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    for batch_files in track(batches, description="segmenting", disable=not sys.stdout.isatty()):
        images, kept = [], []
        for path in batch_files:
            try:
                images.append(read_image(path))
                kept.append(path)
            except ImageTooLargeError as exc:
                problems.append(f"{exc}; to read it anyway, pass --max-pixels {exc.pixels or 'N'}")
            except KvsegError as exc:
                problems.append(str(exc))
        if not kept:
            continue
        for path, image, probability in zip(kept, images, predictor.probabilities(images, tta)):
            height, width = image.shape[:2]
            mask = predictor.mask_at(probability, height, width)
            name = path.stem
            while name in used_names:
                name += "_"
            used_names.add(name)
            write_png(out_dir / f"{name}_mask.png", mask.astype(np.uint8) * 255)
            write_png(out_dir / f"{name}_overlay.png", overlay(image, None, mask)[..., ::-1])
            written += [out_dir / f"{name}_mask.png", out_dir / f"{name}_overlay.png"]
    return written, problems
