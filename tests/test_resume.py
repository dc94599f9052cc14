"""Resume that means what it says: a longer run anneals over its new length, the changes are recorded,
the changes that cannot work are refused in one line; under fp16 a step the scaler skipped moves nothing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from accelerate import Accelerator

import kvseg.training.factory
from conftest import cli_error, entry_point, kvseg_messages
from kvseg.cli import run_cli
from kvseg.config import load_config
from kvseg.data.dataset import build_dataloaders, build_datasets
from kvseg.data.folder import find_samples
from kvseg.models.losses import build_loss
from kvseg.training.factory import prepare_model
from kvseg.training.optim import ONE_CYCLE_PEAK, build_ema, build_optimizer, build_scheduler
from kvseg.training.stopping import Control
from kvseg.training.train import train_one_epoch

SMALL = ["--image-size", "32", "--batch-size", "4", "--num-workers", "0", "--set", "model.base_channels=4",
         "--set", "model.depth=2", "--set", "eval.tta=[]", "--set", "train.channels_last=false"]


def _train(*args: str) -> None:
    """train_ddp.py in this process, one CPU process, as its command line runs it."""
    assert run_cli(entry_point("train_ddp").main, [*args, "--mixed-precision", "no"]) == 0


@pytest.fixture(scope="module")
def two_epochs(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch cosine run. Do not modify: tests copy it."""
    out = tmp_path_factory.mktemp("resume")
    _train("--data-dir", str(synthetic_root), "--output-dir", str(out), "--run-name", "r", "--epochs", "2", *SMALL)
    return out / "r"


def _recorded_lrs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The learning rate of every optimizer step the next run takes (a pre-hook on its optimizer)."""
    rates: list[float] = []

    def build(model, cfg):
        optimizer = build_optimizer(model, cfg)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(kvseg.training.factory, "build_optimizer", build)
    return rates


def _one_cycle(p: float) -> float:
    """OneCycleLR's curve (kvseg.training.optim's module docstring), for the expected rates."""
    def cos_between(start: float, end: float, fraction: float) -> float:
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * fraction))
    low, final = 1 / 25, 1 / 25e4
    return (cos_between(low, 1, p / ONE_CYCLE_PEAK) if p < ONE_CYCLE_PEAK
            else cos_between(1, final, (p - ONE_CYCLE_PEAK) / (1 - ONE_CYCLE_PEAK)))


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_a_longer_resume_anneals_over_the_new_length(two_epochs: Path, tmp_path: Path, schedule: str,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    run = Path(shutil.copytree(two_epochs, tmp_path / "r"))
    if schedule != "cosine":  # a fresh 2-epoch run of that schedule
        shutil.rmtree(run)
        cfg = load_config(two_epochs / "config.yaml")
        _train("--data-dir", cfg.data.root, "--output-dir", str(tmp_path), "--run-name", "r", "--epochs", "2",
               "--set", f"train.scheduler={schedule}", *SMALL)
    steps_done = json.loads((run / "checkpoints" / "state" / "progress.json").read_text())["control"]["steps"]
    rates = _recorded_lrs(monkeypatch)
    _train("--resume", str(run), "--epochs", "4")
    total, lr = 2 * steps_done, load_config(run / "config.yaml").train.lr
    curve = (lambda p: 0.5 * (1 + math.cos(math.pi * p))) if schedule == "cosine" else _one_cycle
    # the schedule of 4 epochs from the step reached: half-way down, never back up, annealed at the end
    assert rates == pytest.approx([lr * curve(step / total) for step in range(steps_done, total)], rel=1e-9)
    assert rates == sorted(rates, reverse=True) and rates[0] > 0.1 * lr and rates[-1] < 0.01 * lr
    assert load_config(run / "config.yaml").train.epochs == 4
    assert f"Resuming with a changed config: train.epochs 2 -> 4 (written to {run / 'config.yaml'})" in kvseg_messages(caplog)
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and history[-1]["steps"] == total


@pytest.mark.parametrize(("change", "key"), [
    (["--set", "model.base_channels=8"], "model.base_channels=8"),
    (["--image-size", "64"], "data.image_size=64"),
    (["--set", "train.optimizer=adamw"], "train.optimizer=adamw"),
    (["--set", "train.ema_decay=0.9"], "train.ema_decay=0.9"),
    (["--set", "data.val_fraction=0.3"], "data.val_fraction=0.3"),
])
def test_changes_a_resume_cannot_make_are_one_line(two_epochs: Path, tmp_path: Path, change: list[str], key: str) -> None:
    run = Path(shutil.copytree(two_epochs, tmp_path / "r"))
    config = (run / "config.yaml").read_bytes()
    message = cli_error("train_ddp", "--resume", str(run), *change)
    assert f"cannot resume with {key} (the run has " in message and "start a new run" in message
    assert (run / "config.yaml").read_bytes() == config


def test_inside_a_preempted_epoch_the_batches_cannot_change(two_epochs: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(two_epochs, tmp_path / "r"))
    progress_file = run / "checkpoints" / "state" / "progress.json"
    progress = json.loads(progress_file.read_text())
    progress["partial"] = {"loss": 0.5, "seconds": 1.0, "images": 8, "lr": 0.001, "steps": 2, "stopped": True,
                           "batches": 2, "epoch_batches": 6}  # as a preemption after 2 batches of epoch 3 leaves it
    progress_file.write_text(json.dumps(progress))
    message = cli_error("train_ddp", "--resume", str(run), "--epochs", "4", "--batch-size", "2")
    assert "cannot resume with train.batch_size=2 (the run has 4): the preempted epoch goes on from its next batch" in message


def test_resume_auto_needs_a_run_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert "--resume auto needs --run-name" in cli_error("train_ddp", "--resume", "auto")


def test_a_step_the_fp16_scaler_skipped_moves_neither_schedule_nor_average(synthetic_root: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate reports a skipped step (inf/NaN gradients under fp16) as optimizer_step_was_skipped; on
    the CPU the scaler never skips, so the report is stood in for: every other step is "skipped"."""
    cfg = load_config(overrides=["data.image_size=32", "data.num_workers=0", "model.base_channels=4", "model.depth=2",
                                 "train.batch_size=2", "train.channels_last=false", "train.ema_decay=0.9",
                                 "train.scheduler=warmup_cosine"])
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    samples = find_samples(synthetic_root)
    loader = build_dataloaders(cfg, build_datasets(cfg, samples, {"train": sorted(samples)[:12]}))["train"]
    model = prepare_model(cfg, accelerator)
    model, optimizer, loader = accelerator.prepare(model, build_optimizer(model, cfg.train), loader)
    scheduler = build_scheduler(optimizer, cfg.train, len(loader))
    ema = build_ema(accelerator.unwrap_model(model), cfg.train)
    control = Control(accelerator, total_steps=len(loader))
    calls = []
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped",
                        property(lambda self: calls.append(1) or len(calls) % 2 == 0))
    stats = train_one_epoch(model, loader, optimizer, build_loss(cfg.train), accelerator, False, scheduler=scheduler,
                            ema=ema, control=control)
    assert len(calls) == len(loader) == 6
    assert stats.steps == control.steps == scheduler.steps == int(ema.n_averaged) == 3
    assert control.progress == pytest.approx(3 / 6)
    assert stats.batches == 6 and stats.images == 12
