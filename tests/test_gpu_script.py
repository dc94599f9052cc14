"""benchmarks/gpu.sh through its command line: the dry run makes every step of the GPU check on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu.sh"
# Stands in for the NVIDIA tool: the machine query, and the utilisation sampler that runs until killed.
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
case "$*" in
    *utilization.gpu*) echo "utilization.gpu [%]"; while true; do echo "42 %"; sleep 0.2; done ;;
    *) echo "name, memory.total [MiB], driver_version"; echo "Fake GPU, 1024 MiB, 0.0" ;;
esac
"""


def run_script(*args: str, cwd: Path, env: dict | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "expected"), [
    (["--dryrun"], "unknown option --dryrun"),
    (["--dry-run", "a", "b"], "more than one RESULTS_DIR"),
])
def test_bad_arguments(tmp_path: Path, args: list[str], expected: str) -> None:
    assert expected in _error(run_script(*args, cwd=tmp_path))
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_real_run_refuses_a_machine_without_gpu(tmp_path: Path) -> None:
    message = _error(run_script(str(tmp_path / "results"), cwd=tmp_path))
    assert "no CUDA GPU" in message and "--dry-run" in message
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_dry_run_makes_every_step_on_the_cpu(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(FAKE_NVIDIA_SMI)
    fake.chmod(0o755)
    repo_paths = [REPO / "runs" / "gpu-h100", REPO / "data" / "synthetic-kvasir-instrument", REPO / "benchmarks" / "results"]
    before = {path: path.stat().st_mtime_ns if path.exists() else None for path in repo_paths}
    results = tmp_path / "results"

    result = run_script("--dry-run", str(results), cwd=tmp_path, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
                        timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])

    log = (results / "gpu_log.txt").read_text()
    for step in ("== machine", "== train", "== export", "== benchmark", "Fake GPU, 1024 MiB"):
        assert step in log, step
    assert "gpu utilisation during training: mean 42 %, max 42 %" in log
    assert (results / "gpu_utilisation.csv").read_text().startswith("utilization.gpu [%]\n42 %\n")
    # The sampler stops with training: nothing of the fake tool runs after the script.
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(fake) in " ".join(p.info["cmdline"] or [])]

    run_dir = results / "work" / "runs" / "gpu-h100"
    config = (run_dir / "config.yaml").read_text()  # configs/gpu_h100.yaml with the dry run's sizes
    assert "image_size: 64" in config and "base_channels: 8" in config and "scheduler: cosine" in config
    for name in ("model.onnx", "model_fp16.onnx", "model_int8.onnx"):
        assert (run_dir / name).is_file(), name
    assert [h["epoch"] for h in json.loads((results / "gpu_history.json").read_text())] == [1]
    assert json.loads((results / "gpu_metrics.json").read_text())["test"]["num_images"] >= 1
    assert [m["precision"] for m in json.loads((results / "gpu_export.json").read_text())["models"]] == ["fp32", "fp16", "int8"]
    report = json.loads((results / "gpu_benchmark.json").read_text())
    assert list(report["backends"]) == ["torch-fp32", "torch-fast", "ort-fp32", "ort-int8"]
    assert sorted(report["skipped"]) == ["ort-cuda-fp16", "ort-cuda-fp32"]  # never run on the CPU under their name
    assert [entry["batch_size"] for entry in report["backends"]["ort-fp32"]["latency"]] == [1, 2]
    assert report["training"]["steps"] == 2
    assert "| torch-fp32 |" in (results / "gpu_benchmark.md").read_text()
    assert {path: path.stat().st_mtime_ns if path.exists() else None for path in repo_paths} == before
