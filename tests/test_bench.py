"""benchmark.py on a tiny model: every report field, parity from real outputs, skipped providers."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import REPO

FIELDS = {"run", "machine", "model", "image_size", "backends", "skipped", "providers_used", "parity", "flagged",
          "training", "training_history", "loader"}


def _benchmark(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--run", str(run_dir), "--iters", "2",
                             "--warmup", "1", "--batch-sizes", "1,2", *args],
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def benchmarked(fresh_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = Path(shutil.copytree(fresh_run, tmp_path_factory.mktemp("bench") / "run"))
    _benchmark(run_dir, "--train-steps", "2", "--loader-seconds", "0.1", "--backends",
               "torch-fp32,torch-fast,ort-fp32,ort-int8,ov-fp32,ov-bf16,ov-int8,ort-cuda-fp32")
    return run_dir, json.loads((run_dir / "benchmark.json").read_text())


def test_report_has_every_field(benchmarked: tuple[Path, dict]) -> None:
    run_dir, report = benchmarked
    assert FIELDS <= set(report)
    assert (run_dir / "model_int8.onnx").is_file()  # exported first, since it was missing
    assert {"cpu", "cpu_cores", "gpus", "packages", "onnxruntime_providers_listed"} <= set(report["machine"])
    assert {"torch-fp32", "torch-fast", "ort-fp32", "ort-int8", "ov-fp32", "ov-int8"} <= set(report["backends"])
    assert set(report["backends"]) - {"ov-bf16"} == {"torch-fp32", "torch-fast", "ort-fp32", "ort-int8", "ov-fp32",
                                                     "ov-int8"}
    for entry in report["backends"].values():
        assert [row["batch_size"] for row in entry["latency"]] == [1, 2]
        for row in entry["latency"]:
            assert 0 < row["median_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["images_per_s"] > 0
    assert "CPUExecutionProvider" in report["providers_used"]
    training = report["training"]
    for loop in ("plain_fp32_nchw", "harness"):
        assert training[loop]["images_per_s"] > 0
        assert training[loop]["speedup_vs_study"] == pytest.approx(300 / training[loop]["projected_epoch_s"])
    assert report["training_history"]["epochs"] == 16
    phases = training["phase_split"]["phases"]
    assert list(phases) == ["data wait", "forward", "backward", "optimizer"] and training["phase_split"]["steps"] == 2
    assert sum(p["share"] for p in phases.values()) == pytest.approx(1.0) and phases["backward"]["ms_per_step"] > 0
    operators = [row["name"] for row in training["top_operators"]]
    assert any("convolution" in name for name in operators)  # the U-Net's own work shows at the top
    markdown = (run_dir / "benchmark.md").read_text()
    assert "| ort-int8 | 2 |" in markdown and "Training speed" in markdown and "| backward |" in markdown
    assert [entry["image_size"] for entry in report["loader"]["sizes"]] == [report["image_size"], 512]
    assert "| 512 | workers | disk cache | 1 |" in markdown and "| 512 | device | disk cache | 1 |" in markdown
    assert training["data_source"] == "disk cache" and training["augment_on"] == "workers"
    assert [entry["step"]["images_per_s"] > 0 for entry in report["loader"]["sizes"]] == [True, True]
    assert markdown.count(" x what the step consumes (") == 4


def test_unavailable_provider_is_reported_as_skipped(benchmarked: tuple[Path, dict]) -> None:
    _, report = benchmarked
    if "ort-cuda-fp32" in report["backends"]:
        pytest.skip("this machine really runs the CUDA provider")
    assert "ort-cuda-fp32" in report["skipped"]
    assert "\n" not in report["skipped"]["ort-cuda-fp32"]


def test_openvino_backends_read_the_same_onnx_files(benchmarked: tuple[Path, dict]) -> None:
    _, report = benchmarked
    parity = report["parity"]
    assert abs(parity["ov-fp32"]["iou_diff_vs_torch_fp32"]) <= 1e-4 and not parity["ov-fp32"]["flagged"]
    assert parity["ov-int8"]["pixels_differing_vs_torch_fp32"] > 0  # really the quantised model
    assert "OpenVINO" in report["backends"]["ov-fp32"]["provider"]
    if "ov-bf16" in report["skipped"]:  # a CPU without native bf16 says so instead of running fp32 under its name
        assert "bf16" in report["skipped"]["ov-bf16"]
    else:
        assert not parity["ov-bf16"]["flagged"]


def test_parity_comes_from_real_outputs(benchmarked: tuple[Path, dict]) -> None:
    _, report = benchmarked
    parity = report["parity"]
    assert parity["torch-fp32"]["iou_diff_vs_torch_fp32"] == 0.0
    assert abs(parity["ort-fp32"]["iou_diff_vs_torch_fp32"]) <= 1e-4 and not parity["ort-fp32"]["flagged"]
    assert parity["ort-int8"]["pixels_differing_vs_torch_fp32"] > 0  # quantisation changes some pixels
    assert report["flagged"] == []


def test_perturbed_onnx_model_is_flagged(benchmarked: tuple[Path, dict], tmp_path: Path) -> None:
    run_dir, _ = benchmarked
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    model = onnx.load(str(copy / "model.onnx"))
    head_bias = next(init for init in model.graph.initializer if init.name.startswith("head") and init.name.endswith("bias"))
    perturbed = numpy_helper.to_array(head_bias) + np.float32(2.0)  # shifts every logit: changes the masks
    head_bias.CopyFrom(numpy_helper.from_array(perturbed, head_bias.name))
    onnx.save(model, str(copy / "model.onnx"))
    result = _benchmark(copy, "--train-steps", "0", "--loader-seconds", "0", "--backends", "torch-fp32,ort-fp32")
    report = json.loads((copy / "benchmark.json").read_text())
    assert report["flagged"] == ["ort-fp32"]
    assert abs(report["parity"]["ort-fp32"]["iou_diff_vs_torch_fp32"]) > 1e-4
    assert "parity flagged" in result.stdout


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"kvseg_benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_lever_changes_only_what_it_names(fresh_run: Path) -> None:
    levers = _script("levers")
    default = levers.measure_one(str(fresh_run), [], warmup=1, steps=2)
    nchw = levers.measure_one(str(fresh_run), ["train.channels_last=false", "data.num_workers=0"], warmup=1, steps=2)
    assert default["images"] == nchw["images"] == 8 and default["images_per_s"] > 0
    assert default["data_source"] == "disk cache" and nchw["num_workers"] == 0
    # same seed, same batches: the layout changes rounding, not what is learnt
    assert nchw["mean_loss"] == pytest.approx(default["mean_loss"], rel=1e-3)
    bilinear = levers.measure_one(str(fresh_run), ["model.upsample=bilinear"], warmup=1, steps=2)
    assert bilinear["mean_loss"] != pytest.approx(default["mean_loss"], rel=1e-3)  # another model
    threads = torch.get_num_threads()
    try:
        assert levers.measure_one(str(fresh_run), ["train.cpu_threads=1"], warmup=0, steps=1)["torch_threads"] == 1
    finally:
        torch.set_num_threads(threads)
    table = levers.markdown({"default": default, "channels_last_off": nchw, "allocator_tcmalloc": {"skipped": "x"}},
                            SimpleNamespace(steps=2, repeats=1))
    assert "| channels_last_off | NCHW instead of channels_last |" in table and "skipped: x" in table
