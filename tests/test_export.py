"""export.py and kvseg.deploy.export on a freshly trained model: parity at another shape, metadata, rules, fail-closed, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import kvseg.deploy.export
from conftest import REPO, cli_error
from kvseg.deploy.export import VerificationError, export_run
from kvseg.deploy.onnx_model import read_metadata
from kvseg.deploy.predict import onnx_predictor, torch_predictor
from kvseg.errors import CheckpointError
from kvseg.runs.checkpoint import load_trained_model, set_threshold


@pytest.fixture(scope="module")
def exported(fresh_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = Path(shutil.copytree(fresh_run, tmp_path_factory.mktemp("export") / "run"))
    result = subprocess.run([sys.executable, str(REPO / "export.py"), "--run", str(run_dir), "--fp16", "--int8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_onnx_matches_pytorch_at_another_batch_and_size(exported: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, _ = exported
    model, _, _ = load_trained_model(run_dir / "checkpoints" / "best.pt")
    session = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(3, 3, 80, 48)).astype(np.float32)  # exported at (2, 3, 64, 64)
    got = session.run(["logits"], {"image": x})[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 1, 80, 48)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_graph_interface_and_checker(exported: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, _ = exported
    model = onnx.load(str(run_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (image,), (logits,) = model.graph.input, model.graph.output
    assert (image.name, logits.name) == ("image", "logits")
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(image) == ["batch", 3, "height", "width"]
    assert dims(logits) == ["batch", 1, "height", "width"]
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_metadata_round_trip(exported: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, _ = exported
    checkpoint = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    for name, precision in (("model.onnx", "fp32"), ("model_fp16.onnx", "fp16"), ("model_int8.onnx", "int8")):
        meta = read_metadata(run_dir / name)
        assert meta["precision"] == precision
        assert meta["image_size"] == 64 and meta["input_multiple"] == 8 and meta["depth"] == 3 and meta["opset"] == 18
        assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["threshold"] == 0.5
        assert meta["config"] == checkpoint["config"]
        assert meta["metrics"] == checkpoint["metrics"]


def test_fp16_and_int8_report_their_iou_change(exported: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, result = exported
    import json

    report = json.loads((run_dir / "export.json").read_text())
    by_precision = {m["precision"]: m for m in report["models"]}
    assert set(by_precision) == {"fp32", "fp16", "int8"}
    fp32 = by_precision["fp32"]["agreement"]
    assert fp32["max_abs_diff"] <= 1e-4 * max(1.0, fp32["max_abs_reference"]) and fp32["max_abs_reference"] > 0
    assert by_precision["int8"]["size_bytes"] < by_precision["fp16"]["size_bytes"] < by_precision["fp32"]["size_bytes"]
    assert abs(by_precision["int8"]["iou_change"]) <= 0.01
    assert by_precision["int8"]["agreement"]["max_abs_diff"] > 1e-4  # really quantised
    assert "test IoU drop" in by_precision["fp16"]["rule"] and abs(by_precision["fp16"]["iou_change"]) <= 0.005
    assert report["verification_split"] == "test (the run has no validation split)"  # the fixture run has none
    assert "test (the run has no validation split) IoU" in result.stdout and "int8" in result.stdout
    quantized = onnx.load(str(run_dir / "model_int8.onnx"))
    assert any(node.op_type == "QuantizeLinear" for node in quantized.graph.node)


def test_failed_verification_leaves_no_model(fresh_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvseg.deploy.export, "FP32_MAX_ABS", 0.0)
    output = tmp_path / "model.onnx"
    with pytest.raises(VerificationError, match=r"max \|logit diff\|"):
        export_run(fresh_run / "checkpoints" / "best.pt", output, run_dir=fresh_run)
    assert list(tmp_path.iterdir()) == []


def test_int8_that_loses_iou_fails_closed(fresh_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvseg.deploy.export, "INT8_MAX_IOU_DROP", -1.0)  # any int8 model now "loses" too much
    output = tmp_path / "model.onnx"
    with pytest.raises(VerificationError, match=r"int8 verification failed: test \(the run has no validation split\) "
                                                r"IoU .* limit -1"):
        export_run(fresh_run / "checkpoints" / "best.pt", output, run_dir=fresh_run, precisions=("fp32", "int8"))
    assert output.is_file()  # the verified fp32 model stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_tuned_threshold_reaches_the_onnx_metadata_and_predict(fresh_run: Path, tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(fresh_run, tmp_path / "run"))
    set_threshold(run_dir / "checkpoints" / "best.pt", 0.3, {"tuned_on": "validation"})
    export_run(run_dir / "checkpoints" / "best.pt", run_dir / "model.onnx", run_dir=run_dir)
    assert read_metadata(run_dir / "model.onnx")["threshold"] == 0.3
    assert torch_predictor(run_dir).threshold == 0.3 and onnx_predictor(run_dir / "model.onnx").threshold == 0.3


def test_fp16_can_fail_its_rule(fresh_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvseg.deploy.export, "FP16_MIN_SAME_CLASS", 1.01)  # no fp16 model can reach this
    output = tmp_path / "model.onnx"
    with pytest.raises(VerificationError, match=r"fp16 verification failed: same class on"):
        export_run(fresh_run / "checkpoints" / "best.pt", output, run_dir=fresh_run, precisions=("fp32", "fp16"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_an_opset_that_cannot_be_written_is_an_error(fresh_run: Path, tmp_path: Path) -> None:
    message = cli_error("export", "--run", str(fresh_run), "--output", str(tmp_path / "model_op11.onnx"),
                        "--opset", "11", "--no-verify")
    assert "opset 11 cannot be honoured" in message and message.endswith("pass --opset 18")
    assert message.startswith(f"error: {tmp_path / 'model_op11.onnx'}:") or "model_op11.onnx:" in message
    assert ".tmp" not in message
    assert list(tmp_path.iterdir()) == []


def _export_error(*args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "export.py"), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


def test_errors(fresh_run: Path, tmp_path: Path) -> None:
    assert "run folder not found" in _export_error("--run", str(tmp_path / "nope"))  # as a process, once
    assert "no run with checkpoints" in cli_error("export", "--runs-dir", str(tmp_path))
    assert "checkpoint not found" in cli_error("export", "--checkpoint", str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    message = cli_error("export", "--checkpoint", str(garbage))
    assert "cannot read checkpoint" in message and "weights_only" not in message  # no advice to unpickle it
    payload = torch.load(fresh_run / "checkpoints" / "best.pt", weights_only=True)
    payload["config"]["model"]["base_channels"] = 16
    other = tmp_path / "other.pt"
    torch.save(payload, other)
    assert "do not fit" in cli_error("export", "--checkpoint", str(other))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = cli_error("export", "--run", str(fresh_run), "--output", str(blocker / "model.onnx"), "--no-verify")
    assert "cannot write" in message


def test_checkpoint_loader_rejects_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a kvseg checkpoint"):
        load_trained_model(path)


def test_int8_calibrates_on_a_seeded_sample_of_the_training_split(fresh_run: Path) -> None:
    from kvseg.deploy.export import calibration_sample, verification_split
    from kvseg.evaluation.datasets import eval_datasets
    from kvseg.runs.folder import RunDir

    _, cfg, _ = load_trained_model(fresh_run / "checkpoints" / "best.pt")
    datasets = eval_datasets(cfg, RunDir(fresh_run))
    batches, drawn = calibration_sample(datasets["train"], 10, seed=0)
    assert sum(len(b) for b in batches) == drawn["images"] == 10 and drawn["split"] == "train"
    assert set(drawn["ids"]) <= set(s.id for s in datasets["train"].samples)
    assert drawn["ids"] != [s.id for s in datasets["train"].samples[:10]]  # not the first ten in order
    assert calibration_sample(datasets["train"], 10, seed=0)[1] == drawn  # the seed decides
    assert calibration_sample(datasets["train"], 10, seed=1)[1]["ids"] != drawn["ids"]
    assert verification_split(datasets)[0] == "test (the run has no validation split)"
    assert verification_split({**datasets, "val": datasets["train"]})[0] == "validation"
