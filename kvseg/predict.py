"""Segment your own images with a trained run or an exported ONNX model.

    python -m kvseg.predict --run RUN_DIR INPUTS... --out DIR [--tta] [--batch-size 8]
    python -m kvseg.predict --onnx model.onnx INPUTS... --out DIR

INPUTS are image files or folders of them. For each image, ``<stem>_mask.png`` (0/255, at the
image's original size) and ``<stem>_overlay.png`` are written to DIR. The ONNX path needs only
ONNX Runtime and the ``kvseg.*`` metadata inside the model file, no checkpoint. Unreadable inputs
are listed and skipped; the command then ends with exit status 2, keeping everything it wrote.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import torch
from rich.progress import track

from kvseg.checkpoint import load_trained_model
from kvseg.cli import run_cli
from kvseg.data import IMAGE_EXTENSIONS, read_image, resize_image
from kvseg.errors import CheckpointError, KvsegError
from kvseg.export import read_metadata
from kvseg.plots import overlay
from kvseg.tta import ALL_TRANSFORMS, tta_logits


@dataclass
class Predictor:
    """Logits for normalised (B, 3, S, S) float32 batches, and how to prepare them."""

    logits: Callable[[np.ndarray], np.ndarray]
    image_size: int
    mean: np.ndarray
    std: np.ndarray
    threshold: float
    max_pixel_value: float = 255.0

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> normalised float32 (3, S, S), as the eval pipeline does."""
        resized = resize_image(image, self.image_size)
        normalised = (resized.astype(np.float32) / self.max_pixel_value - self.mean) / self.std
        return normalised.transpose(2, 0, 1).astype(np.float32)


def torch_predictor(run_dir: str | Path) -> Predictor:
    """The best checkpoint of a run, in fp32 on the CPU."""
    checkpoint = Path(run_dir) / "checkpoints" / "best.pt"
    model, cfg, _ = load_trained_model(checkpoint)

    def logits(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch)).numpy()

    return Predictor(logits, cfg.data.image_size, np.array(cfg.augment.mean, np.float32),
                     np.array(cfg.augment.std, np.float32), cfg.train.threshold)


def onnx_predictor(path: str | Path) -> Predictor:
    """An exported model, set up from its ``kvseg.*`` metadata alone."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX model not found")
    try:
        meta = read_metadata(path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnx and onnxruntime raise their own types for a damaged file
        raise CheckpointError(f"{path}: cannot load the ONNX model ({str(exc).splitlines()[0][:160]})") from None
    missing = [key for key in ("image_size", "mean", "std", "threshold") if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: no kvseg metadata ({', '.join(missing)}); expected a model written by export.py")
    return Predictor(lambda batch: session.run(["logits"], {"image": batch})[0], int(meta["image_size"]),
                     np.array(meta["mean"], np.float32), np.array(meta["std"], np.float32), float(meta["threshold"]),
                     float(meta.get("max_pixel_value", 255.0)))


def collect_inputs(paths: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Image files named directly or found in named folders; and the paths that are neither."""
    files, problems = [], []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path} (not found)")
    return files, problems


def _write_png(path: Path, image: np.ndarray) -> None:
    """Write through a temporary name: an interrupted run never leaves half a PNG."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise KvsegError(f"{path}: could not encode PNG")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encoded.tobytes())
    os.replace(tmp, path)


def predict_files(
    predictor: Predictor, files: Sequence[Path], out_dir: Path, tta: bool = False, batch_size: int = 8
) -> tuple[list[Path], list[str]]:
    """Masks and overlays of ``files`` in ``out_dir``; returns written files and unreadable inputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, problems, used_names = [], [], set()

    def run(batch: np.ndarray) -> np.ndarray:
        if not tta:
            return predictor.logits(batch)
        predict = lambda x: torch.from_numpy(predictor.logits(np.ascontiguousarray(x.numpy())))  # noqa: E731
        return tta_logits(predict, torch.from_numpy(batch), ALL_TRANSFORMS).numpy()

    batches = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    for batch_files in track(batches, description="segmenting", disable=not sys.stdout.isatty()):
        images, kept = [], []
        for path in batch_files:
            try:
                images.append(read_image(path))
                kept.append(path)
            except KvsegError as exc:
                problems.append(str(exc))
        if not kept:
            continue
        probabilities = 1 / (1 + np.exp(-run(np.stack([predictor.prepare(image) for image in images]))))
        for path, image, probability in zip(kept, images, probabilities[:, 0]):
            height, width = image.shape[:2]
            mask = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR) > predictor.threshold
            name = path.stem
            while name in used_names:
                name += "_"
            used_names.add(name)
            _write_png(out_dir / f"{name}_mask.png", mask.astype(np.uint8) * 255)
            _write_png(out_dir / f"{name}_overlay.png", overlay(image, None, mask)[..., ::-1])
            written += [out_dir / f"{name}_mask.png", out_dir / f"{name}_overlay.png"]
    return written, problems


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvseg.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder: uses its best checkpoint")
    source.add_argument("--onnx", help="a model written by export.py (needs no checkpoint)")
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--out", required=True, help="folder for the masks and overlays")
    parser.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations/transposes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    args = parser.parse_args(argv)
    predictor = torch_predictor(args.run) if args.run else onnx_predictor(args.onnx)
    files, problems = collect_inputs(args.inputs)
    written, unreadable = predict_files(predictor, files, Path(args.out), tta=args.tta, batch_size=args.batch_size)
    print(f"wrote {len(written)} files for {len(written) // 2} image(s) to {args.out}")
    problems += unreadable
    if problems:
        raise KvsegError(f"{len(problems)} input(s) skipped: " + "; ".join(problems))


if __name__ == "__main__":
    sys.exit(run_cli(main))
