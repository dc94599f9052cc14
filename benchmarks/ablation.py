"""What each change of a recipe buys: one change at a time, scored on the validation split only.

    python benchmarks/ablation.py --data-dir ../shared/data/kvasir-seg-dev --output-dir runs/ablation \
        [--config configs/real_cpu.yaml] [--epochs 20] [--only recipe,bce] [--json ablation.json] [--md ablation.md]

Each variant is one ``train_ddp.py`` run of the config with one ``--set`` changed (``VARIANTS``), run one
after another in this process's environment, so on a quiet machine their minutes compare. The table
reads each run's ``history.json`` only: validation per-image Dice (best, and the mean of the last five
evaluations, which is less at the mercy of one lucky epoch on a small validation split) and training
minutes (the sum of ``seconds``: training steps only, validation excluded). The test split is scored by
every run, as training always does at its end, but nothing here reads it: an ablation that chose on
the test split would leak it into the recipe. A variant whose run folder already holds a finished run
of the same config, data folder and epoch count is read, not trained again, so an interrupted
ablation goes on with the variants it had not finished (remove the folder of the one it was
training); a finished run of anything else there is an error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from kvseg.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# name -> (what changes against the recipe, the --set overrides that make it)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "recipe": ("the config as it is (default configs/real_cpu.yaml)", []),
    "recipe_seed43": ("same, another seed (run-to-run noise)", ["train.seed=43"]),
    "bce": ("loss BCE (the study's) instead of BCE + Dice", ["train.loss=bce"]),
    "constant_lr": ("constant learning rate instead of warm-up + cosine", ["train.scheduler=none"]),
    "ema": ("EMA of the weights, decay 0.99", ["train.ema_decay=0.99"]),
    "transpose": ("transposed-convolution upsampling instead of bilinear", ["model.upsample=transpose"]),
    "base32": ("base width 32 (the study's) instead of 16", ["model.base_channels=32"]),
    "size256": ("256 px (the study's) instead of 128 px", ["data.image_size=256"]),
    "photometric": ("+ brightness/contrast 0.5, hue/saturation 0.3, blur 0.2, JPEG 0.3",
                    ["augment.brightness_contrast_p=0.5", "augment.hue_saturation_p=0.3", "augment.blur_p=0.2",
                     "augment.jpeg_p=0.3"]),
    "scale": ("+ scale by up to +-25%, half the time", ["augment.scale_limit=0.25", "augment.scale_p=0.5"]),
    "photometric_scale": ("+ both of the above", ["augment.brightness_contrast_p=0.5", "augment.hue_saturation_p=0.3",
                                                   "augment.blur_p=0.2", "augment.jpeg_p=0.3", "augment.scale_limit=0.25",
                                                   "augment.scale_p=0.5"]),
}


def summarise(history: list[dict]) -> dict:
    """Validation scores and minutes of one run, from its history.json rows.

    Returns best validation per-image Dice and its epoch, the mean over the last five evaluated epochs,
    the final one, training minutes (sum of ``seconds``) and validation minutes (sum of ``val_seconds``).
    Raises ValueError when no epoch was evaluated on validation.
    """
    scored = [row for row in history if row.get("val_dice") is not None]
    if not scored:
        raise ValueError("history.json has no epoch with a validation score")
    best = max(scored, key=lambda row: row["val_dice"])
    return {
        "epochs": len(history),
        "best_val_dice": best["val_dice"],
        "best_epoch": best["epoch"],
        "last5_val_dice": statistics.fmean(row["val_dice"] for row in scored[-5:]),
        "final_val_dice": scored[-1]["val_dice"],
        "training_minutes": sum(row["seconds"] for row in history) / 60,
        "validation_minutes": sum(row.get("val_seconds") or 0.0 for row in history) / 60,
        "images_per_s_median": statistics.median(row["images_per_s"] for row in history),
    }


def run_variant(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    """Train one variant (unless its run already finished) and summarise its history."""
    run_dir = Path(args.output_dir) / name
    history = run_dir / "history.json"
    finished = history.exists() and (run_dir / "metrics.json").exists()
    if finished:
        done = load_config(run_dir / "config.yaml")
        asked = load_config(args.config, [*overrides, f"train.epochs={args.epochs}"])
        same = (done.train.epochs == args.epochs and Path(done.data.root).resolve() == Path(args.data_dir).resolve()
                and {k: v for k, v in asdict(done).items() if k not in ("data", "output_dir", "run_name", "eval")}
                == {k: v for k, v in asdict(asked).items() if k not in ("data", "output_dir", "run_name", "eval")})
        if not same:
            raise SystemExit(f"error: {run_dir} holds a finished '{name}' run of another config, data folder or epoch "
                             "count; use another --output-dir")
    else:
        if run_dir.exists():
            raise SystemExit(f"error: {run_dir} exists but holds no finished run; remove it to train '{name}' again")
        command = [sys.executable, str(ROOT / "train_ddp.py"), "--config", args.config, "--data-dir", args.data_dir,
                   "--output-dir", args.output_dir, "--run-name", name, "--epochs", str(args.epochs),
                   "--set", "eval.tta=[]"]
        for override in overrides:
            command += ["--set", override]
        print(f"[{name}] {' '.join(command[1:])}", flush=True)
        log = Path(args.output_dir) / f"{name}.log"
        with log.open("w") as out:
            status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        if status:
            last = (log.read_text().strip().splitlines() or ["no output"])[-1]
            print(f"error: variant '{name}' failed ({last}); see {log}", file=sys.stderr)
            raise SystemExit(2)
    row = summarise(json.loads(history.read_text()))
    print(f"[{name}] best validation Dice {row['best_val_dice']:.4f} (epoch {row['best_epoch']}), last five "
          f"{row['last5_val_dice']:.4f}, {row['training_minutes']:.1f} training min", flush=True)
    return row


def markdown(rows: dict[str, dict], epochs: int) -> str:
    """The table, each variant against the recipe."""
    base = rows.get("recipe")
    lines = [f"| variant ({epochs} epochs) | change | best val Dice (epoch) | mean of last 5 | Δ vs recipe "
             "(last 5) | training min |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, row in rows.items():
        delta = f"{row['last5_val_dice'] - base['last5_val_dice']:+.3f}" if base and name != "recipe" else "—"
        lines.append(f"| {name} | {VARIANTS[name][0]} | {row['best_val_dice']:.3f} ({row['best_epoch']}) | "
                     f"{row['last5_val_dice']:.3f} | {delta} | {row['training_minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--output-dir", required=True, help="one run folder per variant is made here")
    parser.add_argument("--config", default=str(ROOT / "configs" / "real_cpu.yaml"))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(VARIANTS)}")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--md", help="write the Markdown table here")
    args = parser.parse_args(argv)
    names = [name for name in args.only.split(",") if name] if args.only is not None else list(VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        parser.exit(2, f"error: --only: unknown variant(s) {', '.join(unknown) or '(none given)'}; "
                       f"expected any of {', '.join(VARIANTS)}\n")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.exit(2, f"error: --output-dir {args.output_dir} is a file; expected a folder\n")
    for path in (args.json, args.md):
        if path and not Path(path).resolve().parent.is_dir():
            parser.exit(2, f"error: {path}: its folder does not exist\n")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    rows = {name: run_variant(name, VARIANTS[name][1], args) for name in names}
    table = markdown(rows, args.epochs)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"epochs": args.epochs, "config": args.config, "rows": rows}, indent=2))
    if args.md:
        Path(args.md).write_text(table)


if __name__ == "__main__":
    main()
