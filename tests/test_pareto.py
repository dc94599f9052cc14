"""benchmarks/pareto.py: the front's arithmetic, and (slow) the whole command on two tiny models, run twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO
from kvseg.bench.pareto import model_cost, pareto_front
from kvseg.models.light import SIZES, LightSeg


def test_the_front_keeps_only_points_nothing_beats_on_both() -> None:
    points = [{"fps": 100, "test_dice": 0.80}, {"fps": 50, "test_dice": 0.85}, {"fps": 40, "test_dice": 0.84},
              {"fps": 100, "test_dice": 0.70}, {"fps": None, "test_dice": 0.99}]
    assert pareto_front(points, "fps") == [0, 1]


def test_model_cost_counts_two_flops_per_multiply_add() -> None:
    cost = model_cost(LightSeg(SIZES["light-s"]), 64)
    head = 8 * 1 * 32 * 32  # the 1x1 head alone: 8 channels in, 1 out, at 32x32: its multiply-adds
    assert cost["gflops_64"] == pytest.approx(2 * cost["gmacs_64"]) and cost["gmacs_64"] * 1e9 > head
    assert cost["parameters"] == sum(p.numel() for p in LightSeg(SIZES["light-s"]).parameters())
    assert model_cost(LightSeg(SIZES["light-s"]), 128)["gflops_128"] == pytest.approx(4 * cost["gflops_64"], rel=1e-6)


def _pareto(data: Path, out: Path, results: Path, minutes: str = "0.2", epochs: str = "1",
            status: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pareto.py"), "--data-dir", str(data), "--output-dir", str(out),
         "--models", "unet-8,light-s", "--minutes", minutes, "--epochs", epochs, "--image-size", "64",
         "--latency-size", "64", "--iters", "2", "--video-frames", "4", "--tag", "tiny", "--results-dir", str(results),
         "--set", "train.batch_size=4", "--set", "data.num_workers=0"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == status, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_pareto_trains_measures_and_resumes(synthetic_root: Path, tmp_path: Path) -> None:
    out, results = tmp_path / "runs", tmp_path / "results"
    _pareto(synthetic_root, out, results)
    report = json.loads((results / "pareto_tiny.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"unet-8", "light-s"}
    for name, row in rows.items():
        assert row["arch"] == {"unet-8": "unet", "light-s": "light-s"}[name]
        assert 0 <= row["test_dice"] <= 1 and row["parameters"] > 0 and row["gflops_64"] > 0
        assert row["fps_1_thread_64"] > 0 and row["fps_2_threads_64"] > 0 and row["video_fps_720p"] > 0
        assert {"torch-fp32", "ort-fp32", "ort-int8"} <= set(row["latency_ms"])
        assert set(row["latency_ms"]["ort-int8"]) == {"1", "2"}
        metrics = json.loads((Path(row["run"]) / "metrics.json").read_text())
        assert row["test_dice"] == metrics["test"]["per_image"]["dice"]  # the validation-selected weights, no TTA
    assert rows["light-s"]["parameters"] < rows["unet-8"]["parameters"]
    assert "| light-s |" in (results / "pareto_tiny.md").read_text()
    assert Image.open(results / "pareto_tiny.png").size[0] > 500
    trained = {name: (Path(row["run"]) / "checkpoints" / "best.pt").stat().st_mtime for name, row in rows.items()}
    again = _pareto(synthetic_root, out, results)
    assert again.stdout.count("read, not retrained") == 2 and again.stdout.count("measured before: read") == 2
    assert {name: (Path(row["run"]) / "checkpoints" / "best.pt").stat().st_mtime for name, row in rows.items()} == trained
    other = _pareto(synthetic_root, out, results, minutes="0.3", epochs="2", status=1)
    assert "holds a run of another model, size, seed or training time" in other.stderr  # never read as this one
