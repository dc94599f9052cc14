"""The budget table: the plan against the hand-sized recipe at the same minutes, on one folder.

    python benchmarks/budgets.py --data-dir ../shared/data/kvasir-seg-dev --output-dir runs/budgets \
        [--budgets 10m,30m,60m] [--only plan,recipe] [--json budgets.json] [--md budgets.md]

For each budget, two ``train_ddp.py`` runs, one after the other in this process's environment (so on
a quiet machine their minutes compare): ``plan`` (``--plan auto --budget B``: probe, plan, train) and
``recipe`` (``--config configs/real_cpu.yaml --budget B``: the recipe sized by hand, fitted to the same
minutes by the budget). Each run selects its epoch on validation and scores the test split once, at its
end, as every run does; this script reads the test per-image Dice without TTA (``eval.tta=[]``), the
minutes used against the budget, the epochs and steps done and the validation interval. A finished
run is read, not trained again (remove its folder to retrain); nothing is chosen here on the test split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from kvseg.training.stopping import parse_duration

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "plan": lambda budget: ["--plan", "auto", "--budget", budget],
    "recipe": lambda budget: ["--config", str(ROOT / "configs" / "real_cpu.yaml"), "--budget", budget],
}


def run_one(name: str, budget: str, args: argparse.Namespace) -> dict:
    """Train one variant at one budget (unless its run finished) and read its metrics."""
    run_name = f"{name}_{budget}"
    run_dir = Path(args.output_dir) / run_name
    if not (run_dir / "metrics.json").is_file():
        if run_dir.exists():
            raise SystemExit(f"error: {run_dir} exists but holds no finished run; remove it to train it again")
        command = [sys.executable, str(ROOT / "train_ddp.py"), *VARIANTS[name](budget), "--data-dir", args.data_dir,
                   "--output-dir", args.output_dir, "--run-name", run_name, "--set", "eval.tta=[]", *args.extra]
        print(f"[{run_name}] {' '.join(command[1:])}", flush=True)
        log = Path(args.output_dir) / f"{run_name}.log"
        with log.open("w") as out:
            status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        if status:
            last = (log.read_text().strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"error: {run_name} failed ({last}); see {log}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = (run_dir / "config.yaml").read_text()
    training, selection = metrics["training"], metrics["selection"]
    row = {
        "variant": name, "budget": budget, "budget_minutes": parse_duration(budget),
        "minutes_used": training["minutes_used"], "epochs": training["epochs"], "steps": training["steps"],
        "stop_reason": training["stop_reason"], "selected_epoch": selection["epoch"],
        "val_dice": selection.get("score"), "val_dice_ci95": selection.get("dice_ci95"),
        "test_dice": metrics["test"]["per_image"]["dice"], "test_iou": metrics["test"]["per_image"]["iou"],
        "image_size": _value(config, "image_size"), "base_channels": _value(config, "base_channels"),
    }
    print(f"[{run_name}] {row['minutes_used']:.2f} of {row['budget_minutes']:g} min, {row['epochs']} epochs, "
          f"test Dice {row['test_dice']:.4f}", flush=True)
    return row


def _value(config_yaml: str, key: str) -> int | None:
    for line in config_yaml.splitlines():
        if line.strip().startswith(f"{key}:"):
            return int(line.split(":", 1)[1].split("#")[0])
    return None


def markdown(rows: list[dict]) -> str:
    lines = ["| budget | variant | size / width | minutes used | epochs (steps) | selected epoch (val Dice, 95% CI) "
             "| test Dice per image |", "| --- | --- | --- | ---: | ---: | --- | ---: |"]
    for r in rows:
        ci = r["val_dice_ci95"]
        val = f"{r['val_dice']:.3f}" + (f", {ci[0]:.3f}-{ci[1]:.3f}" if ci else "") if r["val_dice"] is not None else "-"
        lines.append(f"| {r['budget']} | {r['variant']} | {r['image_size']} px / {r['base_channels']} | "
                     f"{r['minutes_used']:.2f} | {r['epochs']} ({r['steps']}) | {r['selected_epoch']} ({val}) | "
                     f"**{r['test_dice']:.3f}** |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--budgets", default="10m,30m,60m", help="comma-separated durations (default 10m,30m,60m)")
    parser.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--json")
    parser.add_argument("--md")
    parser.add_argument("extra", nargs="*", help="more train_ddp.py arguments after --, e.g. -- --set train.seed=1")
    args = parser.parse_args(argv)
    budgets = [b for b in args.budgets.split(",") if b]
    names = [n for n in args.only.split(",") if n]
    try:
        for budget in budgets:
            parse_duration(budget)
    except ValueError as exc:
        parser.exit(2, f"error: --budgets: {exc}\n")
    if not names or any(n not in VARIANTS for n in names):
        parser.exit(2, f"error: --only: expected some of {', '.join(VARIANTS)}\n")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    rows = [run_one(name, budget, args) for budget in budgets for name in names]
    table = markdown(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"data_dir": args.data_dir, "rows": rows}, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(table)


if __name__ == "__main__":
    main()
