"""The time budget: a run stops when its minutes are spent, with the learning rate annealed; ranks stop together;
resume keeps what is left."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, TINY_TRAINING, cli_error, entry_point
from kvseg.cli import run_cli
from kvseg.training.stopping import parse_duration

TWO_CPU_PROCESSES = ["accelerate", "launch", "--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml")]
QUIET = ["--set", "eval.tta=[]", "--set", "train.scheduler=warmup_cosine", "--set", "train.warmup_epochs=1"]


def _train(*args: str) -> int:
    return run_cli(entry_point("train_ddp").main, [*TINY_TRAINING, *QUIET, *args])


def _read(run: Path) -> tuple[dict, list[dict]]:
    return json.loads((run / "metrics.json").read_text()), json.loads((run / "history.json").read_text())


def _slack(history: list[dict]) -> float:
    """What a budget may be overrun by: the slowest step (the stop is checked after each) and how much longer the
    last epoch's validation and saves took than the one before, which the budget kept in reserve."""
    step_seconds = max(row["seconds"] / max(1, row["steps"] - previous["steps"])
                       for previous, row in zip([{"steps": 0}, *history], history))
    tails = [row["val_seconds"] or 0.0 for row in history]
    return step_seconds + max(tails) + 1.0


def test_a_budget_stops_the_run_when_spent_with_the_learning_rate_at_the_floor(synthetic_root: Path, tmp_path: Path) -> None:
    assert _train("--data-dir", str(synthetic_root), "--output-dir", str(tmp_path), "--run-name", "b",
                  "--budget", "12s", "--epochs", "1000") == 0
    metrics, history = _read(tmp_path / "b")
    training = metrics["training"]
    assert training["stop_reason"] == "budget" and training["epochs"] == len(history) < 1000
    used = training["minutes_used"] * 60
    assert abs(used - 12.0) <= _slack(history)  # stopped early by the reserve kept for the last validation, or late by a step
    assert history[-1]["progress"] == pytest.approx(1.0) and history[-1]["steps"] == training["steps"]
    assert training["final_lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine floor, at the end of the budget
    lrs = [row["lr"] for row in history]
    assert lrs[1:] == sorted(lrs[1:], reverse=True)  # after warm-up, down to the end of the budget


def test_epochs_bound_a_budget_and_resume_keeps_the_clock(synthetic_root: Path, tmp_path: Path) -> None:
    common = ["--data-dir", str(synthetic_root), "--output-dir", str(tmp_path), "--run-name", "r", "--budget", "10m"]
    assert _train(*common, "--epochs", "1") == 0
    first, history = _read(tmp_path / "r")
    assert first["training"]["stop_reason"] == "epochs" and len(history) == 1  # the epochs ran out first ...
    assert history[-1]["progress"] == pytest.approx(1.0)  # ... and the schedule followed the step limit to its end
    assert _train("--resume", str(tmp_path / "r"), "--epochs", "2") == 0
    resumed, history = _read(tmp_path / "r")
    spent = [row["budget_seconds_used"] for row in history]
    assert len(history) == 2 and first["training"]["minutes_used"] * 60 >= spent[0]
    # the clock went on from where the first part saved it: it did not restart
    assert resumed["training"]["minutes_used"] * 60 >= spent[1] > spent[0] + history[1]["seconds"]


def test_a_resumed_budget_starts_where_it_left(synthetic_root: Path) -> None:
    from accelerate import Accelerator

    from kvseg.training.stopping import Control

    control = Control(Accelerator(cpu=True), total_steps=1000, budget_seconds=100.0, steps=10, seconds_used=60.0)
    assert control.progress == pytest.approx(0.6)  # 40 s of the budget are left
    control.clock._seconds = 100.0
    assert control.after_step() and control.reason == "budget" and control.progress == 1.0


def test_max_steps_trains_exactly_that_many_steps(synthetic_root: Path, tmp_path: Path) -> None:
    assert _train("--data-dir", str(synthetic_root), "--output-dir", str(tmp_path), "--run-name", "s",
                  "--set", "train.max_steps=11", "--epochs", "1") == 0  # the step limit, not the epochs, decides
    metrics, history = _read(tmp_path / "s")
    assert metrics["training"]["steps"] == 11 and metrics["training"]["stop_reason"] == "max_steps"
    assert [row["steps"] for row in history][-1] == 11 and history[-1]["progress"] == pytest.approx(1.0)


@pytest.mark.parametrize("text, minutes", [("30m", 30.0), ("1.5h", 90.0), ("90s", 1.5), ("1h30m", 90.0), ("45", 45.0)])
def test_durations(text: str, minutes: float) -> None:
    assert parse_duration(text) == pytest.approx(minutes)


def test_a_bad_budget_is_one_line(tmp_path: Path) -> None:
    assert "--budget: 'soon' is not a duration" in cli_error("train_ddp", "--budget", "soon", "--output-dir", str(tmp_path))
    assert "train.budget_minutes" in cli_error("train_ddp", "--set", "train.budget_minutes=-3", "--output-dir", str(tmp_path))


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_of_a_budget(synthetic_root: Path, tmp_path: Path) -> None:
    result = subprocess.run([*TWO_CPU_PROCESSES, str(REPO / "train_ddp.py"), *TINY_TRAINING, *QUIET, "--data-dir",
                             str(synthetic_root), "--output-dir", str(tmp_path), "--run-name", "ddp", "--budget", "15s",
                             "--epochs", "1000", "--set", "train.cpu_threads=1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]  # a rank that stopped a step apart hangs or fails agree_on_steps
    metrics, history = _read(tmp_path / "ddp")
    assert metrics["training"]["stop_reason"] == "budget"
    assert 15.0 <= metrics["training"]["minutes_used"] * 60 <= 15.0 + _slack(history)
