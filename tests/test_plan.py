"""The plan: a fingerprint of the folder, a probe of the machine (mocked here, real in a slow test), a config
whose every value says why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, cli_error
from kvseg.config import load_config
from kvseg.data.check import check_folder
from kvseg.planning.fingerprint import Fingerprint
from kvseg.planning.planner import TARGET_STEPS, WIDTHS, candidate_sizes, make_plan
from kvseg.planning.probe import Measurement, Probe

FINGERPRINT = Fingerprint("dev", 300, 256, 256, fraction_p05=0.0256, fraction_median=0.118, empty_masks=0,
                          train=190, val=50, test=60)


def fake_probe(rate_at_128_base16: float, layout_flip_at: int = 256, sizes: tuple[int, ...] = (128, 160, 192, 224, 256)
               ) -> Probe:
    """Images/s falling with the square of the size and the width; channels_last faster below ``layout_flip_at``."""
    probe = Probe("cpu", "bf16", 2, native_bf16=True, seconds=30.0)
    for size in sizes:
        for width in WIDTHS:
            rate = rate_at_128_base16 * (128 / size) ** 2 * (16 / width) ** 1.5
            for layout, factor in (("channels_last", 1.1 if size < layout_flip_at else 0.8), ("nchw", 1.0)):
                probe.measurements.append(Measurement(size, width, layout, "bf16", 2, rate * factor, 3))
    return probe


def test_a_short_budget_takes_the_cheapest_model_and_says_what_it_lacks() -> None:
    plan = make_plan(FINGERPRINT, fake_probe(10.0), budget_minutes=5)
    assert plan.values["data.image_size"] == 128 and plan.values["model.base_channels"] == 16
    assert any("expect a lower score" in note for note in plan.notes)


def test_a_longer_budget_buys_width_first_then_resolution() -> None:
    medium = make_plan(FINGERPRINT, fake_probe(60.0), budget_minutes=30)
    long = make_plan(FINGERPRINT, fake_probe(60.0), budget_minutes=600)
    assert medium.values["data.image_size"] == 128 and medium.values["model.base_channels"] > 16
    chosen = next(e for e in medium.estimates if (e.image_size, e.base_channels) == (128, medium.values["model.base_channels"]))
    assert chosen.steps >= TARGET_STEPS
    assert long.values["data.image_size"] > 128 and long.values["model.base_channels"] == max(WIDTHS)


def test_small_objects_raise_the_resolution() -> None:
    tiny_objects = Fingerprint("f", 300, 512, 512, fraction_p05=0.002, fraction_median=0.01, empty_masks=0,
                               train=190, val=50, test=60)
    plan = make_plan(tiny_objects, fake_probe(2000.0, sizes=(128, 192, 256, 320, 384)), budget_minutes=120)
    assert plan.values["data.image_size"] >= 320  # where a 5th-percentile object is 12 px across (or one size up)
    assert make_plan(FINGERPRINT, fake_probe(2000.0, sizes=(128, 192, 256, 320, 384)), 120).values["data.image_size"] < 320


def test_the_layout_comes_from_the_probe() -> None:
    assert make_plan(FINGERPRINT, fake_probe(60.0, layout_flip_at=256), 30).values["train.channels_last"] is True
    assert make_plan(FINGERPRINT, fake_probe(60.0, layout_flip_at=128), 30).values["train.channels_last"] is False


def test_the_plan_is_a_config_with_a_reason_on_every_value(tmp_path: Path) -> None:
    plan = make_plan(FINGERPRINT, fake_probe(60.0), budget_minutes=30)
    path = tmp_path / "plan.yaml"
    path.write_text(plan.to_yaml())
    cfg = load_config(path)
    assert cfg.data.image_size == plan.values["data.image_size"] and cfg.train.budget_minutes == 30
    values = [line for line in path.read_text().splitlines() if line.startswith("  ")]
    assert values and all("  # " in line for line in values), [line for line in values if "  # " not in line]
    assert "epochs are expected to fit in the budget" in path.read_text()
    assert yaml.safe_load(path.read_text())["train"]["epochs"] >= 10


def test_the_fingerprint_of_a_folder(synthetic_root: Path) -> None:
    fingerprint = Fingerprint.of(check_folder(synthetic_root))
    assert fingerprint.images == 32 and fingerprint.short_side == 64
    assert fingerprint.train + fingerprint.val + fingerprint.test == 32
    assert 0 < fingerprint.fraction_p05 <= fingerprint.fraction_median < 1
    assert candidate_sizes(fingerprint) == [128]  # nothing above the frames' own size but the smallest candidate


def test_plan_auto_refuses_several_processes_and_needs_a_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert "--plan auto plans for a folder" in cli_error("train_ddp", "--plan", "auto", "--output-dir", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "in one process" in cli_error("train_ddp", "--plan", "auto", "--data-dir", str(tmp_path))
    monkeypatch.delenv("WORLD_SIZE")
    assert "without --config" in cli_error("train_ddp", "--plan", "auto", "--config", "x.yaml")
    from kvseg.cli import run_cli
    from kvseg.commands.plan import main as plan_main

    assert run_cli(plan_main, [str(tmp_path), "--probe-seconds", "0"]) == 2


@pytest.mark.slow
def test_plan_auto_probes_for_real_then_trains_the_plan(synthetic_root: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), "--plan", "auto", "--budget", "20s", "--data-dir",
                             str(synthetic_root), "--output-dir", str(tmp_path), "--run-name", "p", "--set", "eval.tta=[]",
                             "--num-workers", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "p"
    plan = yaml.safe_load((run / "plan.yaml").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["image_size"] == plan["data"]["image_size"]
    assert config["train"]["budget_minutes"] == pytest.approx(1 / 3)
    assert "# probe: cpu" in (run / "plan.yaml").read_text()
    assert json.loads((run / "metrics.json").read_text())["training"]["stop_reason"] in ("budget", "epochs")
