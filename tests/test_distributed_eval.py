"""Distributed evaluation moves counts, not logits: two CPU processes score exactly as the gather-logits path did.

The launch (tests/two_processes_evaluate.py under ``accelerate launch`` with two gloo processes)
scores 11 images in batches of 2 per process, so the last batches are evened out with a duplicate,
at two image sizes; see that script for what it measures.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, free_port

SIZES = (32, 64)


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("two") / "report.json"
    command = ["accelerate", "launch", "--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml"),
               "--main_process_port", str(free_port()), str(REPO / "tests" / "two_processes_evaluate.py"), str(out),
               *map(str, SIZES)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=out.parent,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["processes"] == 2
    return report


@pytest.mark.parametrize("size", SIZES)
def test_the_same_numbers_as_gathering_logits(launch: dict, size: int) -> None:
    entry = launch["sizes"][str(size)]
    result, reference, alone = entry["result"], entry["reference"], entry["alone"]
    assert [row["id"] for row in result["images"]] == reference["ids"]  # every image once, in the same order
    assert sorted(reference["ids"]) == [f"img{i:02d}" for i in range(11)]
    assert result["confusion_matrix"] == reference["confusion_matrix"]
    for key in ("iou", "dice", "loss"):
        assert [row[key] for row in result["images"]] == pytest.approx(reference[key], abs=1e-6)
    assert result["average_precision"] == pytest.approx(reference["average_precision"], abs=1e-6)
    assert result["roc_auc"] == pytest.approx(reference["roc_auc"], abs=1e-6)
    # and as one process alone over the whole split
    for key in ("per_image", "dataset", "confusion_matrix"):
        assert result[key] == pytest.approx(alone[key], abs=1e-6), key
    for key, points in alone["curves"].items():
        assert result["curves"][key] == pytest.approx(points, abs=1e-6), key
    assert result["loss"] == pytest.approx(alone["loss"], abs=1e-6)
    assert sorted(row["id"] for row in result["images"]) == sorted(row["id"] for row in alone["images"])


def test_per_batch_communication_does_not_depend_on_the_image_size(launch: dict) -> None:
    small, large = (launch["sizes"][str(size)] for size in SIZES)
    for entry in (small, large):
        gathers = [size for kind, size in entry["counts_calls"] if kind == "gather"]
        reduces = [size for kind, size in entry["counts_calls"] if kind == "reduce"]
        assert len(gathers) == entry["batches"] and len(reduces) == 1  # one small gather a batch, one reduce at the end
        assert set(gathers) == {2 * 8 * 8}  # 2 images x 8 float64 numbers
        assert reduces == [2 * 2**16 * 8]  # the ranking histogram, once
    assert small["counts_calls"] == large["counts_calls"]
    per_batch = {size: launch["sizes"][str(size)]["logits_calls"][0][1] for size in SIZES}
    assert per_batch[64] > 3.9 * per_batch[32]  # the replaced path moved every pixel of every batch


def test_the_training_loss_counts_each_image_once(launch: dict) -> None:
    train = launch["train"]
    assert train["trained"] == 12  # the even batches hold one duplicate ...
    assert train["images"] == 11  # ... which the epoch's loss leaves out
    assert train["loss"] == pytest.approx(train["expected"], abs=1e-6)
