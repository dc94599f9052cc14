"""Each architecture family (U-Net, light, smp) through the whole path: train, report, export + int8, ONNX parity
at another batch and size, OpenVINO, predict. The smp family is skipped where segmentation_models_pytorch is not
installed (it is the optional ``[smp]`` extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import REPO, entry_point
from kvseg.cli import run_cli
from kvseg.deploy.backends import openvino_backend
from kvseg.deploy.export import export_run
from kvseg.deploy.onnx_model import read_metadata
from kvseg.deploy.predict import onnx_predictor
from kvseg.evaluation.report import feature_maps
from kvseg.models.library import smp_available
from kvseg.runs.checkpoint import load_trained_model
from kvseg.runs.folder import RunDir

NEEDS_SMP = pytest.mark.skipif(not smp_available(), reason="segmentation_models_pytorch is not installed "
                               "(the optional extra: pip install -e '.[smp]')")

# family -> (size, the --set overrides of a tiny model of it)
FAMILIES = {
    "unet": (64, ["model.arch=unet", "model.base_channels=8", "model.depth=3"]),
    "light": (64, ["model.arch=light-s"]),
    "smp": (64, ["model.arch=smp.Unet", "model.encoder=resnet18"]),
}
PARAMS = [pytest.param(name, marks=NEEDS_SMP) if name == "smp" else name for name in FAMILIES]


def train_tiny(data: Path, out: Path, name: str, size: int, overrides: list[str], epochs: int = 1) -> RunDir:
    """A finished run of ``epochs`` epochs at ``size`` px, trained in this process by the train command."""
    args = ["--data-dir", str(data), "--output-dir", str(out), "--run-name", name, "--epochs", str(epochs),
            "--image-size", str(size), "--batch-size", "4", "--num-workers", "0", "--set", "eval.tta=[identity]"]
    for override in overrides:
        args += ["--set", override]
    assert run_cli(entry_point("train_ddp").main, args) == 0
    return RunDir(out / name)


@pytest.mark.parametrize("family", PARAMS)
def test_family_trains_exports_and_matches_onnx(family: str, synthetic_root: Path, tmp_path: Path) -> None:
    size, overrides = FAMILIES[family]
    run = train_tiny(synthetic_root, tmp_path, family, size, overrides)
    metrics = json.loads(run.metrics.read_text())
    assert metrics["test"]["num_images"] > 0 and metrics["selection"]["split"] == "validation"
    assert (run.path / "feature_maps.png").is_file() and "Feature maps" in run.index.read_text()

    report = export_run(run.best, run.onnx("fp32"), run_dir=run.path, precisions=("fp32", "int8"))
    assert report.verification_split == "validation"  # item 5: never the test split when there is a validation one
    assert report.calibration["split"] == "train" and report.calibration["ids"] != sorted(report.calibration["ids"])

    model, cfg, _ = load_trained_model(run.best)
    multiple = model.input_multiple
    meta = read_metadata(run.onnx("fp32"))
    assert meta["arch"] == cfg.model.arch and meta["input_multiple"] == multiple and meta["mean"] == cfg.augment.mean
    session = ort.InferenceSession(str(run.onnx("fp32")), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(3, 3, size + multiple, size)).astype(np.float32)  # exported at batch 1
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = session.run(["logits"], {"image": x})[0]
    assert got.shape == (3, 1, size + multiple, size)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))

    int8 = next(m for m in report.models if m.precision == "int8")
    assert int8.agreement.max_abs_diff > 1e-5  # really quantised, and within the int8 rule (else export raised)
    openvino = openvino_backend("ov-int8", run.onnx("int8"), "f32")
    probabilities = onnx_predictor(run.onnx("int8"), "openvino").probabilities([np.zeros((50, 70, 3), np.uint8)])
    assert probabilities.shape == (1, size, size) and np.isfinite(probabilities).all()
    assert openvino.logits(torch.from_numpy(x)).shape == (3, 1, size + multiple, size)

    maps = feature_maps(model, torch.from_numpy(x[0]))
    assert len(maps) >= 3 and all(m.ndim == 3 and m.shape[1] > 1 for m in maps.values())


@pytest.mark.slow
@pytest.mark.parametrize("family", [name for name in PARAMS if name != "unet"])  # the U-Net's: test_train_cli.py
def test_family_trains_in_two_processes(family: str, synthetic_root: Path, tmp_path: Path) -> None:
    """DDP on two CPU processes (accelerate launch): one line per epoch, one checkpoint, a model that loads."""
    size, overrides = FAMILIES[family]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate/cpu_2proc.yaml"), str(REPO / "train_ddp.py"), "--data-dir", str(synthetic_root),
               "--output-dir", str(tmp_path),
               "--run-name", family, "--epochs", "2", "--image-size", str(size), "--batch-size", "4",
               "--num-workers", "0", "--set", "eval.tta=[]"]
    for override in overrides:
        command += ["--set", override]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith("Epoch [2/2]")]) == 1
    model, cfg, _ = load_trained_model(tmp_path / family / "checkpoints" / "best.pt")
    assert cfg.model.arch == overrides[0].split("=")[1] and model.input_multiple in (16, 32)
