"""The speed/accuracy front of kvseg's models: each trained for the same minutes, then scored, counted and timed.

    python benchmarks/pareto.py --data-dir ../shared/data/kvasir-seg-dev --output-dir runs/pareto --minutes 10 \
        [--models unet-16,light-s,light-m] [--seeds 0,1] [--tag cpu_avx2] [--set KEY=VALUE ...]

Each model of ``--models`` (default: every entry of ``MODELS``, the smp ones where segmentation_models_pytorch
is installed) is one ``train_ddp.py`` run of ``--config`` (default ``configs/real_cpu.yaml``) at ``--image-size``
(256) with the model's ``--set`` overrides, per seed, one after another in this environment, so on a quiet machine
their minutes compare. The training time is ``--budget {minutes}m`` where ``train_ddp.py`` has that flag (with
``--epochs`` an upper bound, if given); before it has, ``--epochs`` is required and the minutes are what those
epochs took (each row records which). ``best.pt`` is
validation-selected, and training scores the test split once with it: the row's ``test_dice`` is that per-image
Dice without TTA, read from metrics.json. Each run is exported to fp32 and int8 ONNX (verified on validation),
then measured by :func:`kvseg.bench.pareto.measure_point`: parameters, GFLOPs per image, batch-1 latency at
``--latency-size`` (256) on 1 and 2 threads for torch-fp32, ort-fp32, ort-int8, ov-fp32 and ov-int8, and the
720p video fps of the fastest backend on 2 threads.

Resumable: a finished run is read, not retrained; an unfinished one with a saved epoch is resumed; a measured
point is kept in ``OUTPUT_DIR/pareto_points.json`` and not measured again with the same settings. Writes
``benchmarks/results/pareto_TAG.json`` (rows, each named by ``name`` and the one ``model.arch`` value with the
overrides that rebuild it), ``pareto_TAG.md`` (the table, with the machine and load) and ``pareto_TAG.png``
(test Dice against batch-1 fps on one thread, the front joined).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from matplotlib.figure import Figure

from kvseg.bench.pareto import measure_point, pareto_front
from kvseg.bench.training import FULL
from kvseg.cli import configure_logging
from kvseg.commands.train import build_parser as train_parser
from kvseg.config import TrainConfig, load_config
from kvseg.deploy.export import export_run
from kvseg.files import replacing, write_json, write_text
from kvseg.models.build import family_of
from kvseg.models.library import smp_available
from kvseg.runs.folder import RunDir
from kvseg.runtime import describe_machine

ROOT = Path(__file__).resolve().parents[1]

# name -> the --set overrides that build it (the first one is always its model.arch)
MODELS: dict[str, list[str]] = {
    "unet-8": ["model.arch=unet", "model.base_channels=8", "model.depth=4", "model.upsample=bilinear"],
    "unet-16": ["model.arch=unet", "model.base_channels=16", "model.depth=4", "model.upsample=bilinear"],
    "unet-32": ["model.arch=unet", "model.base_channels=32", "model.depth=4", "model.upsample=bilinear"],
    "light-s": ["model.arch=light-s"],
    "light-m": ["model.arch=light-m"],
    "light-l": ["model.arch=light-l"],
    "smp.Unet-resnet18": ["model.arch=smp.Unet", "model.encoder=resnet18"],
    "smp.UnetPlusPlus-resnet18": ["model.arch=smp.UnetPlusPlus", "model.encoder=resnet18"],
    "smp.FPN-mobilenet_v2": ["model.arch=smp.FPN", "model.encoder=mobilenet_v2"],
    "smp.DeepLabV3Plus-mobilenet_v2": ["model.arch=smp.DeepLabV3Plus", "model.encoder=mobilenet_v2"],
}


def has_budget() -> bool:
    """Whether ``train_ddp.py`` takes a time budget (``--budget`` and ``train.budget_minutes``)."""
    flags = {flag for action in train_parser()._actions for flag in action.option_strings}
    return "--budget" in flags and hasattr(TrainConfig(), "budget_minutes")


def check_same(run: RunDir, name: str, seed: int, schedule: dict, args: argparse.Namespace) -> None:
    """Stop when ``run`` holds a run of another model, seed, size or training time than the one asked for."""
    done = load_config(run.config)
    asked = load_config(args.config, [*MODELS[name], *args.set, f"data.image_size={args.image_size}",
                                      f"train.seed={seed}"])
    minutes = getattr(done.train, "budget_minutes", None)
    same = (done.model == asked.model and done.data.image_size == asked.data.image_size and done.train.seed == seed
            and (minutes == args.minutes if "budget_minutes" in schedule else done.train.epochs == args.epochs))
    if not same:
        raise SystemExit(f"error: {run} holds a run of another model, size, seed or training time than {name} "
                         f"(seed {seed}) asked here; use another --output-dir")


def train(name: str, seed: int, args: argparse.Namespace) -> tuple[RunDir, dict]:
    """The finished run of ``name`` and ``seed``: read when it finished, resumed when it saved an epoch, else trained."""
    run = RunDir(Path(args.output_dir) / f"{name}-seed{seed}")
    schedule = {"budget_minutes": args.minutes, "max_epochs": args.epochs} if has_budget() else {"epochs": args.epochs}
    if run.config.is_file():
        check_same(run, name, seed, schedule, args)
    if run.metrics.is_file():
        print(f"[{run.path.name}] finished before: read, not retrained", flush=True)
        return run, schedule
    if (run.checkpoints / "state" / "progress.json").is_file():
        command = [sys.executable, str(ROOT / "train_ddp.py"), "--resume", str(run)]
    else:
        command = [sys.executable, str(ROOT / "train_ddp.py"), "--config", args.config, "--data-dir", args.data_dir,
                   "--output-dir", args.output_dir, "--run-name", run.path.name, "--image-size", str(args.image_size),
                   "--seed", str(seed), "--set", "eval.tta=[]"]
        if "budget_minutes" in schedule:
            command += ["--budget", f"{args.minutes:g}m"]
        if args.epochs is not None:  # without a budget the schedule; with one, an upper bound
            command += ["--epochs", str(args.epochs)]
        for override in [*MODELS[name], *args.set]:
            command += ["--set", override]
    print(f"[{run.path.name}] {' '.join(command[1:])}", flush=True)
    log = Path(args.output_dir) / f"{run.path.name}.log"
    with log.open("a") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if status or not run.metrics.is_file():
        last = (log.read_text().strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: {run.path.name} failed ({last}); see {log}")
    return run, schedule


def measure(name: str, seed: int, args: argparse.Namespace, points: dict) -> dict:
    """The row of ``name`` and ``seed``: trained (or read), exported, then measured unless measured before alike."""
    run, schedule = train(name, seed, args)
    settings = {"latency_size": args.latency_size, "video_frames": args.video_frames, "iters": args.iters}
    key = run.path.name
    if key in points and points[key]["settings"] == settings:
        print(f"[{key}] measured before: read", flush=True)
        return points[key]["row"]
    if not (run.onnx("fp32").is_file() and run.onnx("int8").is_file()):
        export_run(run.best, run.onnx("fp32"), run_dir=run.path, precisions=("fp32", "int8"), data_dir=args.data_dir)
    budget = FULL if args.iters is None else replace(FULL, min_iters=args.iters, max_iters=args.iters, warmup_steps=2)
    point = measure_point(run, args.latency_size, budget, args.video_frames, args.data_dir)
    arch = MODELS[name][0].split("=", 1)[1]
    row = {"name": name, "arch": arch, "overrides": MODELS[name] + list(args.set), "seed": seed, "run": str(run),
           **schedule, **point}
    points[key] = {"settings": settings, "row": row}
    write_json(Path(args.output_dir) / "pareto_points.json", points)
    print(f"[{key}] test Dice {row['test_dice']:.4f}, {row['parameters']:,} parameters, "
          f"{row[f'gflops_{args.latency_size}']:.3f} GFLOPs, {row[f'fps_1_thread_{args.latency_size}'] or 0:.1f} fps "
          f"on 1 thread, {row.get('video_fps_720p') or 0:.1f} fps 720p video", flush=True)
    return row


def markdown(rows: list[dict], size: int, machine: dict) -> str:
    """The table: one line per row, front members marked, the machine and load named."""
    front = set(pareto_front(rows, f"fps_1_thread_{size}"))
    lines = [f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores; torch {machine['packages'].get('torch')}; "
             f"load average before each row in the JSON (`load_average`).", "",
             f"| model | model.arch | seed | parameters | GFLOPs @{size} | test Dice | val Dice | epochs | train min "
             f"| fps 1 thread (backend) | fps 2 threads (backend) | 720p video fps | front |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | --- |"]
    for i, r in enumerate(rows):
        one, two = r.get(f"fps_1_thread_{size}"), r.get(f"fps_2_threads_{size}")
        val = "—" if r["val_dice"] is None else f"{r['val_dice']:.4f}"
        lines.append(
            f"| {r['name']} | `{' '.join(r['overrides'])}` | {r['seed']} | {r['parameters']:,} | {r[f'gflops_{size}']:.3f} "
            f"| {r['test_dice']:.4f} | {val} | {r['epochs']} | {r['training_minutes']:.1f} "
            f"| {one or 0:.1f} ({r['best_backend_1_thread']}) | {two or 0:.1f} ({r['best_backend_2_threads']}) "
            f"| {r.get('video_fps_720p') or 0:.1f} | {'yes' if i in front else ''} |")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], size: int, path: Path) -> None:
    """Test Dice against batch-1 fps on one thread (log scale), each row labelled, the front joined."""
    speed = f"fps_1_thread_{size}"
    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    for family, colour in (("unet", "tab:blue"), ("light", "tab:green"), ("smp", "tab:orange")):
        members = [r for r in rows if r.get(speed) and family_of(r["arch"]) == family]
        ax.scatter([r[speed] for r in members], [r["test_dice"] for r in members], color=colour, label=family, zorder=3)
        for r in members:
            ax.annotate(f"{r['name']} s{r['seed']}", (r[speed], r["test_dice"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    front = sorted((rows[i] for i in pareto_front(rows, speed)), key=lambda r: r[speed])
    ax.plot([r[speed] for r in front], [r["test_dice"] for r in front], color="grey", linestyle="--", label="front")
    ax.set_xscale("log")
    ax.set_xlabel(f"batch-1 frames/s at {size}x{size}, one thread, best backend")
    ax.set_ylabel("test Dice per image (no TTA)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--output-dir", required=True, help="one run folder per model and seed is made here")
    parser.add_argument("--config", default=str(ROOT / "configs" / "real_cpu.yaml"), help="the shared recipe")
    parser.add_argument("--minutes", type=float, default=10.0, help="training minutes per model (train_ddp.py --budget)")
    parser.add_argument("--epochs", type=int, help="epochs per model, where train_ddp.py has no --budget yet")
    parser.add_argument("--image-size", type=int, default=256, help="training size (default 256)")
    parser.add_argument("--latency-size", type=int, default=256, help="side of the timed batch-1 input (default 256)")
    parser.add_argument("--models", help=f"comma-separated subset of: {','.join(MODELS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    parser.add_argument("--video-frames", type=int, default=250, help="frames of the 720p clip (0: no video row)")
    parser.add_argument("--iters", type=int, help="timed calls per backend and thread count (default: sized to 8 s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every model")
    parser.add_argument("--tag", default="cpu", help="the results are benchmarks/results/pareto_TAG.{json,md,png}")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    configure_logging()
    names = args.models.split(",") if args.models else [n for n in MODELS if smp_available() or "." not in n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.exit(2, f"error: --models: unknown {', '.join(unknown)}; expected any of {', '.join(MODELS)}\n")
    if not smp_available() and any("." in n for n in names):
        parser.exit(2, "error: --models names smp models, but segmentation_models_pytorch is not installed "
                       "(pip install -e \".[smp]\")\n")
    if not has_budget() and args.epochs is None:
        parser.exit(2, "error: train_ddp.py has no --budget here yet; pass --epochs N (the rows record it)\n")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    points_path = Path(args.output_dir) / "pareto_points.json"
    points = json.loads(points_path.read_text()) if points_path.is_file() else {}
    rows = [measure(name, int(seed), args, points) for name in names for seed in args.seeds.split(",")]
    machine = describe_machine()
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / f"pareto_{args.tag}.json", {"machine": machine, "data_dir": args.data_dir, "config": args.config,
                                                     "image_size": args.image_size, "minutes": args.minutes,
                                                     "load_average_end": os.getloadavg(), "rows": rows})
    table = markdown(rows, args.latency_size, machine)
    write_text(results / f"pareto_{args.tag}.md", table)
    figure(rows, args.latency_size, results / f"pareto_{args.tag}.png")
    print(table)
    print(f"wrote {results / f'pareto_{args.tag}'}.json, .md and .png")


if __name__ == "__main__":
    main()
