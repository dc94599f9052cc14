"""Losses, learning-rate schedules, weight averaging and the checkpoint policy, in-process."""

import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from kvseg.config import TrainConfig
from kvseg.evaluation.evaluate import EvalResult
from kvseg.models.losses import LOSSES, build_loss
from kvseg.runs.folder import Progress, RunDir
from kvseg.training.optim import ProgressSchedule, build_ema, build_optimizer, build_scheduler
from kvseg.training.saver import CheckpointSaver

BIG = 20.0


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1  # 16 of 64 pixels
    return masks, (masks * 2 - 1) * BIG  # logits that are right everywhere, with confidence


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_is_near_zero_when_right_and_large_when_wrong(name: str) -> None:
    loss = build_loss(TrainConfig(loss=name))
    masks, right = _pair()
    assert loss(right, masks).item() < 1e-3
    assert loss(-right, masks).item() > 0.5


def test_losses_follow_their_definitions() -> None:
    masks, right = _pair()
    logits = torch.zeros_like(masks)  # probability 0.5 everywhere
    bce = build_loss(TrainConfig(loss="bce"))(logits, masks).item()
    dice = build_loss(TrainConfig(loss="dice"))(logits, masks).item()
    assert bce == pytest.approx(math.log(2), rel=1e-5)
    # soft Dice of p = 0.5 on 16 of 64 pixels: 2 * 8 / (32 + 16) = 1/3
    assert dice == pytest.approx(1 - 1 / 3, rel=1e-3)
    assert build_loss(TrainConfig(loss="bce+dice"))(logits, masks).item() == pytest.approx(bce + dice, rel=1e-4)
    # focal (gamma 2) down-weights the easy pixels: at p = 0.5 every pixel weighs (1 - 0.5) ** 2
    assert build_loss(TrainConfig(loss="focal"))(logits, masks).item() == pytest.approx(0.25 * bce, rel=1e-3)
    # Tversky (alpha 0.3 on false positives, beta 0.7 on misses): missing the object costs more than over-segmenting
    tversky = build_loss(TrainConfig(loss="tversky"))
    missed = torch.full_like(masks, -BIG)
    everything = torch.full_like(masks, BIG)
    assert tversky(missed, masks).item() > tversky(everything, masks).item()


def _lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    rates, total = [], cfg.epochs * steps_per_epoch
    for step in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.set_progress((step + 1) / total)  # progress by steps, as kvseg.training.stopping.Control gives it
    return rates


def test_progress_schedules_end_annealed_and_onecycle_matches_torch() -> None:
    model = torch.nn.Linear(2, 1)
    for kind in ("cosine", "warmup_cosine"):
        optimizer = build_optimizer(model, TrainConfig(lr=0.1))
        schedule = ProgressSchedule(optimizer, kind, warmup_steps=3)
        for progress in (0.1, 0.2, 0.3, 0.55, 0.8, 1.0):
            schedule.set_progress(progress)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the floor at progress 1
    # torch's OneCycleLR policy: the same start, peak (within a step: torch counts phases by step index) and end
    cfg = TrainConfig(scheduler="onecycle", epochs=4, lr=0.1)
    ours = _lrs(cfg, steps_per_epoch=5)
    reference_optimizer = torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_optimizer, max_lr=0.1, total_steps=20)
    theirs = []
    for _ in range(20):
        theirs.append(reference_optimizer.param_groups[0]["lr"])
        reference_optimizer.step()
        reference.step()
    peak = ours.index(max(ours))
    assert ours[0] == pytest.approx(theirs[0]) and abs(peak - theirs.index(max(theirs))) <= 1
    assert max(ours) == pytest.approx(0.1, rel=0.02) and ours[:peak] == sorted(ours[:peak])
    assert ours[peak:] == sorted(ours[peak:], reverse=True)
    schedule = ProgressSchedule(build_optimizer(torch.nn.Linear(2, 1), cfg), "onecycle")
    assert 0.1 * schedule.factor(1.0) == pytest.approx(min(theirs), rel=1e-6)


def test_schedule_state_continues_the_curve() -> None:
    optimizer = build_optimizer(torch.nn.Linear(2, 1), TrainConfig(lr=0.1))
    schedule = ProgressSchedule(optimizer, "warmup_cosine", warmup_steps=2)
    for progress in (0.1, 0.2, 0.3):
        schedule.set_progress(progress)
    resumed = ProgressSchedule(build_optimizer(torch.nn.Linear(2, 1), TrainConfig(lr=0.1)), "warmup_cosine", 2)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.factor(0.6) == schedule.factor(0.6) and resumed.warmup_end == pytest.approx(0.2)


def test_warmup_then_cosine() -> None:
    rates = _lrs(TrainConfig(scheduler="warmup_cosine", epochs=4, lr=0.1, warmup_epochs=1), steps_per_epoch=5)
    assert rates[0] == pytest.approx(0.001)  # 1% of the peak
    assert rates[:6] == sorted(rates[:6]) and rates[5] == pytest.approx(0.1)  # linear rise over one epoch
    assert rates[5:] == sorted(rates[5:], reverse=True) and rates[-1] < 0.005  # cosine down towards 0
    assert _lrs(TrainConfig(scheduler="none", epochs=2, lr=0.1), 3) == [0.1] * 6


def test_ema_averages_weights_and_batchnorm_statistics() -> None:
    assert build_ema(torch.nn.Linear(2, 1), TrainConfig()) is None
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = build_ema(model, TrainConfig(ema_decay=0.9))
    assert isinstance(ema, AveragedModel)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(1.0)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module[0].weight, 0.9 * (start + 1) + 0.1 * (start + 2))
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((2,), 0.9 * 1 + 0.1 * 3))


def _result(dice: float, loss: float) -> EvalResult:
    from kvseg.evaluation.metrics import ConfusionMatrix, Scores

    scores = Scores(iou=dice, dice=dice, precision=1, recall=1, accuracy=1, specificity=1)
    return EvalResult(loss, "bce", scores, scores, None, None, ConfusionMatrix(0, 0, 0, 0), 0.5, [], {})


def test_checkpoint_saver_selects_on_validation_and_stops_early(tmp_path) -> None:
    run = RunDir(tmp_path)
    progress = Progress()
    saver = CheckpointSaver(run, progress, "dice")
    seen = []
    for epoch, dice in enumerate([0.5, 0.7, 0.6, 0.65, 0.9], start=1):
        progress.epoch = epoch
        seen.append(saver.save(torch.nn.Linear(1, 1), None, epoch, _result(dice, 1 - dice), write=False))
        if not saver.patience_left(patience=2, eval_every=1):
            break
    assert seen == [True, True, False, False] and progress.best_epoch == 2  # stopped before epoch 5
    by_loss = CheckpointSaver(run, Progress(), "loss")
    assert by_loss.improves(_result(0.1, 0.9)) and (by_loss.save(torch.nn.Linear(1, 1), None, 1, _result(0.1, 0.9), False))
    assert by_loss.improves(_result(0.1, 0.5)) and not by_loss.improves(_result(0.1, 0.95))
    assert CheckpointSaver(run, Progress(), None).improves(None)  # no validation split: every epoch is the latest best
