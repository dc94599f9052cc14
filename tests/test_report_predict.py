"""Figures and index.html of a run, test-time augmentation, and python -m kvseg.predict."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kvseg.cli import run_cli
from kvseg.commands.predict import main as predict_main
from kvseg.deploy.export import export_run
from kvseg.evaluation.report import FIGURES
from kvseg.evaluation.tta import ALL_TRANSFORMS, DIHEDRAL, tta_logits


def _module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_copy(fresh_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(fresh_run, tmp_path_factory.mktemp("report") / "run"))


def test_report_command_recreates_every_figure(run_copy: Path) -> None:
    for name in [*FIGURES, "index.html"]:
        (run_copy / name).unlink(missing_ok=True)
    result = _module("kvseg.report", str(run_copy))
    assert result.returncode == 0, result.stderr[-3000:]
    page = (run_copy / "index.html").read_text()
    for name in FIGURES:
        image = cv2.imread(str(run_copy / name))
        assert image is not None and image.shape[0] > 200 and image.shape[1] > 200, name
        assert image.std() > 10, f"{name} looks blank"
        assert f'src="{name}"' in page
    assert "iou" in page and "plain, per-image" in page  # no metrics.json: evaluated by the report itself


def test_report_of_a_missing_run_is_one_line(tmp_path: Path) -> None:
    result = _module("kvseg.report", str(tmp_path / "nothing"))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ALL_TRANSFORMS)
def test_each_transform_inverts_exactly(name: str) -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    forward, inverse = DIHEDRAL[name]
    assert torch.equal(inverse(forward(x)), x)


def test_identity_model_gives_back_its_input() -> None:
    logits = torch.linspace(-6, 6, 2 * 8 * 8).reshape(2, 1, 8, 8)
    images = logits.expand(2, 3, 8, 8)
    out = tta_logits(lambda x: x[:, :1], images, ALL_TRANSFORMS)
    torch.testing.assert_close(out, logits, rtol=0, atol=1e-4)


def test_flipped_prediction_maps_back_to_the_original_place() -> None:
    # A model that only looks at each pixel: its prediction on a flipped image, mapped back, must land
    # exactly where the direct prediction is. A position-dependent model shows the mapping is not a no-op.
    images = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pointwise = lambda x: x[:, :1] * 3  # noqa: E731 - logits within +-3, where the sigmoid/logit round trip stays within 1e-6
    for name in ALL_TRANSFORMS:
        torch.testing.assert_close(tta_logits(pointwise, images, [name]), pointwise(images), rtol=0, atol=1e-4)
    ramp = torch.arange(8.0).expand(1, 1, 8, 8) - 3.5  # logits growing to the right, whatever the input
    positional = lambda x: ramp.expand(len(x), 1, 8, 8)  # noqa: E731
    flipped = tta_logits(positional, images, ["hflip"])
    torch.testing.assert_close(flipped, ramp.flip(-1), rtol=0, atol=1e-4)


def test_predict_with_pytorch_and_onnx_give_the_same_masks(run_copy: Path, synthetic_root: Path, tmp_path: Path) -> None:
    export_run(run_copy / "checkpoints" / "best.pt", run_copy / "model.onnx", run_dir=run_copy)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in sorted((synthetic_root / "images").iterdir())[:5]:
        shutil.copy(path, inputs)
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    by_torch = _module("kvseg.predict", "--run", str(run_copy), str(inputs), "--out", str(tmp_path / "torch"))
    by_onnx = _module("kvseg.predict", "--onnx", str(run_copy / "model.onnx"), str(inputs), "--out", str(tmp_path / "onnx"))
    for result in (by_torch, by_onnx):
        assert result.returncode == 2  # the broken input is reported ...
        assert "broken.jpg" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    masks = sorted((tmp_path / "torch").glob("*_mask.png"))
    assert len(masks) == 5  # ... and every other image was still segmented
    for mask_path in masks:
        a = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        b = cv2.imread(str(tmp_path / "onnx" / mask_path.name), cv2.IMREAD_GRAYSCALE)
        original = cv2.imread(str(inputs / mask_path.name.replace("_mask.png", ".jpg")))
        assert a.shape == original.shape[:2]  # at the input's original size
        assert set(np.unique(a)) <= {0, 255}
        assert np.mean(a != b) < 1e-4
        assert (tmp_path / "torch" / mask_path.name.replace("_mask", "_overlay")).is_file()
    assert run_cli(predict_main, ["--onnx", str(run_copy / "model.onnx"), str(inputs), "--out", str(tmp_path / "ov"),
                                  "--runtime", "openvino"]) == 2  # the broken input again
    for mask_path in masks:  # OpenVINO reads the same file and gives the same masks
        a = cv2.imread(str(tmp_path / "onnx" / mask_path.name), cv2.IMREAD_GRAYSCALE)
        assert np.mean(a != cv2.imread(str(tmp_path / "ov" / mask_path.name), cv2.IMREAD_GRAYSCALE)) < 1e-4
    (tmp_path / "empty").mkdir()
    assert run_cli(predict_main, ["--onnx", str(run_copy / "model.onnx"), str(tmp_path / "empty"), "--out",
                                  str(tmp_path / "none")]) == 2  # a folder with no images is not a success
    with_tta = _module("kvseg.predict", "--onnx", str(run_copy / "model.onnx"), str(inputs / "synth0000.jpg"),
                       "--out", str(tmp_path / "tta"), "--tta")
    assert with_tta.returncode == 0, with_tta.stderr
    assert (tmp_path / "tta" / "synth0000_mask.png").is_file()
