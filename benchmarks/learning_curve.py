"""Test Dice against training minutes, drawn after a run from the epoch checkpoints it kept.

    python benchmarks/learning_curve.py RUN_DIR [RUN_DIR ...] [--json curve.json] [--png curve.png]

A run trained with ``--set train.keep_every=K`` keeps ``checkpoints/epoch_NNNN.pt`` every K epochs.
This script scores each of them on the run's test split and pairs the score with the training
minutes spent up to that epoch (the sum of ``seconds`` in history.json: training only, validation
excluded). It is for reports only: it runs after training, and nothing it measures can reach the
choice of ``best.pt``, which validation made during the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader

from kvseg.cli import run_cli
from kvseg.errors import CheckpointError
from kvseg.evaluation.datasets import eval_datasets
from kvseg.evaluation.evaluate import evaluate, torch_logits
from kvseg.files import write_json
from kvseg.runs.checkpoint import load_trained_model, threshold_of
from kvseg.runs.folder import open_run


def curve(run_dir: str | Path) -> dict:
    """Per kept epoch: training minutes so far, test per-image Dice and IoU; and the selected epoch."""
    run = open_run(run_dir)
    kept = run.epoch_checkpoints()
    if not kept:
        raise CheckpointError(f"{run}: no checkpoints/epoch_*.pt (train with --set train.keep_every=K)")
    history = json.loads(run.history.read_text())
    minutes, total = {}, 0.0
    for row in history:
        total += row["seconds"] / 60
        minutes[row["epoch"]] = total
    _, cfg, best = run.load_model()
    test = DataLoader(eval_datasets(cfg, run)["test"], batch_size=8)
    points = []
    for epoch, path in kept:
        model, _, _ = load_trained_model(path)
        result = evaluate(torch_logits(model), test, threshold_of(best))
        points.append({"epoch": epoch, "training_minutes": minutes.get(epoch), "test_dice": result.per_image.dice,
                       "test_iou": result.per_image.iou})
        print(f"{run.path.name} epoch {epoch}: {minutes.get(epoch, 0):.1f} min, test Dice {result.per_image.dice:.4f}")
    return {"run": str(run), "selected_epoch": best.get("epoch"), "points": points}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders trained with train.keep_every")
    parser.add_argument("--json", help="write the curves here")
    parser.add_argument("--png", help="draw the curves here")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    curves = [curve(run) for run in args.runs]
    if args.json:
        write_json(Path(args.json), curves)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for entry in curves:
            ax.plot([p["training_minutes"] for p in entry["points"]], [p["test_dice"] for p in entry["points"]],
                    marker="o", label=Path(entry["run"]).name)
        ax.set_xlabel("training minutes")
        ax.set_ylabel("test per-image Dice")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    sys.exit(run_cli(main))
