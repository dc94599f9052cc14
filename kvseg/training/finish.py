"""The end of a run: the selected weights, the threshold tuned on validation, and the test split scored once."""

from __future__ import annotations

import logging
from dataclasses import asdict

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from kvseg.config import Config
from kvseg.evaluation.evaluate import EvalResult, tune_threshold
from kvseg.evaluation.uncertainty import within
from kvseg.runs.checkpoint import load_model_checkpoint, set_threshold
from kvseg.training.factory import Training
from kvseg.training.saver import CheckpointSaver
from kvseg.training.stopping import Control

logger = logging.getLogger(__name__)


def finish_run(cfg: Config, training: Training, score, saver: CheckpointSaver, accelerator: Accelerator,
               control: Control) -> None:
    """Load the selected weights, tune the threshold on validation (optional), then score the test split once.

    Writes metrics.json and per_image.csv (the figures and index.html are :mod:`kvseg.evaluation.report`'s,
    written by the command after training). The test split is evaluated here and nowhere
    else, with the weights and threshold that validation chose.
    """
    run, loaders, scored = saver.run, training.loaders, training.logits
    accelerator.wait_for_everyone()
    selected = [load_model_checkpoint(run.best)["model"] if accelerator.is_main_process else None]
    broadcast_object_list(selected)  # other machines may not see the main machine's files
    training.weights.load_state_dict(selected[0])
    threshold, tuning = cfg.train.threshold, None
    if cfg.eval.tune_threshold and "val" in loaders:
        choice = tune_threshold(scored, loaders["val"], cfg.eval.threshold_grid, processes=accelerator,
                                normalise=training.normalise)
        threshold, tuning = choice.value, asdict(choice)
        logger.info(f"Threshold {threshold} (tuned on validation: per-image Dice {max(choice.dice):.4f})")
        if accelerator.is_main_process:
            set_threshold(run.best, threshold, tuning)
    selection = {**saver.selection(), **selection_uncertainty(saver.progress.history, saver.progress.best_epoch)}
    logger.info(f"Selected epoch {selection['epoch']}"
                + (f" (validation {selection['metric']} {selection['score']:.4f})" if selection["split"] else
                   " (no validation split: the last epoch)") + _noise_line(selection))
    results = {name: score(scored, loaders[name], threshold=threshold) for name in ("val", "test") if name in loaders}
    logger.info(f"Test {results['test'].line()}")
    metrics = {"epoch": selection["epoch"], "epochs_trained": saver.progress.epoch,
               "stopped_early": saver.progress.stopped_early, "selection": selection,
               "training": {"steps": control.steps, "epochs": saver.progress.epoch, "stop_reason": saver.progress.stop_reason,
                            "budget_minutes": cfg.train.budget_minutes or None, "minutes_used": control.clock.seconds / 60,
                            "final_lr": training.optimizer.param_groups[0]["lr"]},
               "threshold": {"value": threshold, "tuned_on": "validation" if tuning else None, **(tuning or {})},
               **{("validation" if name == "val" else name): _without_rows(result) for name, result in results.items()}}
    if cfg.eval.tta:
        tta = score(scored, loaders["test"], threshold=threshold, tta=cfg.eval.tta)
        logger.info(f"With TTA ({len(cfg.eval.tta)} transforms): Test {tta.line()}")
        metrics["test_tta"] = _without_rows(tta)
    if accelerator.is_main_process:
        run.write_metrics(metrics)
        run.write_per_image([{**asdict(row), "split": "validation" if name == "val" else name}
                             for name, result in results.items() for row in result.images])
    accelerator.log({f"test_{k}": v for k, v in asdict(results["test"].per_image).items()}, step=saver.progress.epoch)


def selection_uncertainty(history: list[dict], best_epoch: int | None) -> dict:
    """The selected epoch's 95% bootstrap interval of validation per-image Dice, and the evaluated epochs inside it."""
    row = next((r for r in history if r["epoch"] == best_epoch), None)
    interval = tuple(row["val_dice_ci95"]) if row and row.get("val_dice_ci95") else None
    if interval is None:
        return {}
    others = within(interval, {r["epoch"]: r.get("val_dice") for r in history if r["epoch"] != best_epoch})
    return {"dice_ci95": list(interval), "epochs_within_ci95": others}


def _noise_line(selection: dict) -> str:
    if "dice_ci95" not in selection:
        return ""
    low, high = selection["dice_ci95"]
    others = selection["epochs_within_ci95"]
    shown = ", ".join(map(str, others[-8:])) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
    return (f"; validation Dice 95% interval {low:.3f}-{high:.3f}"
            + (f", which also holds epoch(s) {shown}: the split cannot tell them apart" if others else ""))


def _without_rows(result: EvalResult) -> dict:
    """An evaluation for metrics.json: its per-image rows go to per_image.csv instead."""
    return {k: v for k, v in result.to_json().items() if k != "images"}
