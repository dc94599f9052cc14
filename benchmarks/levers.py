"""Each CPU speed lever of the training step, alone, against the step as train_ddp.py runs it.

    python benchmarks/levers.py --run RUN_DIR [--steps 8] [--warmup 3] [--repeats 3] [--only default,workers_0]
                                [--set data.cache=disk] [--json levers.json] [--md levers.md]

Every lever runs in its own process (so that an allocator, chosen when a process starts, really
changes) as the harness of ``benchmark.py`` (:class:`kvseg.bench.training.Harness`: the run's
config, its training split, :func:`kvseg.training.train.train_one_epoch`), with one environment variable or
one ``--set`` changed (``LEVERS``). After ``--warmup`` steps (which include any compiling, timed
apart), ``--steps`` optimizer steps are timed. Two processes of the same setting differ by up to
about 10% on a shared 2-core machine, so ``--repeats`` runs the whole list that many times, in
rounds (each lever once per round, so a slow spell of the machine touches every lever alike), and
the table gives the median images/s of each lever, its spread, the ratio of medians to ``default``
and the mean training loss over the timed steps, which shows whether the lever changed what is
learnt (every lever starts from the same seed and sees the same batches). ``--set`` changes the
run's config for every lever alike (e.g. today's defaults for a run trained before them). Run it on a quiet machine:
the levers are timed one after another, and anything else running skews the ratios.
"""

from __future__ import annotations

from kvseg.allocator import reexec_with_allocator
from kvseg.evaluation.datasets import eval_datasets

if __name__ == "__main__":
    reexec_with_allocator()  # the child measuring one lever runs under the allocator its environment asks for

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kvseg.allocator import DONE as ALLOCATOR_ACTIVE
from kvseg.bench.training import Harness
from kvseg.cli import run_cli
from kvseg.config import load_config
from kvseg.errors import ConfigError
from kvseg.runs.folder import RunDir
from kvseg.runtime import describe_machine, usable_cores

# name -> (what changes, environment, --set overrides)
LEVERS: dict[str, tuple[str, dict[str, str], list[str]]] = {
    "default": ("the run's config as train_ddp.py runs it (allocator auto; channels_last, workers, threads and cache "
                "as the config says)",
                {}, []),
    "allocator_off": ("glibc malloc untuned (KVSEG_ALLOCATOR=off)", {"KVSEG_ALLOCATOR": "off"}, []),
    "allocator_glibc": ("glibc malloc tuned for large blocks", {"KVSEG_ALLOCATOR": "glibc"}, []),
    "allocator_tcmalloc": ("tcmalloc preloaded (needs libtcmalloc-minimal4)", {"KVSEG_ALLOCATOR": "tcmalloc"}, []),
    "channels_last_off": ("NCHW instead of channels_last", {}, ["train.channels_last=false"]),
    "workers_0": ("no DataLoader worker: the training process loads", {}, ["data.num_workers=0"]),
    "workers_cores": ("one DataLoader worker per core", {}, [f"data.num_workers={usable_cores()}"]),
    "threads_1": ("one torch thread", {}, ["train.cpu_threads=1"]),
    "omp_bind": ("OpenMP threads bound to cores (OMP_PROC_BIND=close, OMP_PLACES=cores)",
                 {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}, []),
    "cache_off": ("decoding every read instead of the disk cache", {}, ["data.cache=off"]),
    "bilinear": ("bilinear upsampling instead of transposed convolutions (another model)", {}, ["model.upsample=bilinear"]),
    "transpose": ("transposed-convolution upsampling instead of bilinear (another model)", {}, ["model.upsample=transpose"]),
    "compile": ("torch.compile of the U-Net (compiling timed apart, in the warm-up)", {}, ["train.compile=true"]),
}


def measure_one(run_dir: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """Images/s and mean loss of ``steps`` harness steps of the run's config with ``overrides``."""
    run = RunDir(run_dir)
    cfg = load_config(run.config, overrides)
    train_set = eval_datasets(cfg, run)["train"]
    harness = Harness(cfg, train_set.samples, train_set.encoding, train_set.frames)
    start = time.perf_counter()
    harness.run(warmup)
    warmup_s = time.perf_counter() - start
    timed_from = len(harness.losses)
    images, seconds = harness.run(steps)
    timed = harness.losses[timed_from:]
    loss = sum(n * value for n, value in timed) / sum(n for n, _ in timed)
    return {"images_per_s": images / seconds, "seconds": seconds, "images": images, "warmup_s": warmup_s,
            "mean_loss": loss, "allocator": os.environ.get(ALLOCATOR_ACTIVE, "off"), **harness.settings()}


def measure_lever(name: str, args: argparse.Namespace) -> dict:
    """Run one lever once in a fresh process; its result, or why it was skipped."""
    _, env, overrides = LEVERS[name]
    command = [sys.executable, __file__, "--run", args.run, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--child", json.dumps([*args.set, *overrides])]
    child_env = {key: value for key, value in os.environ.items() if key != ALLOCATOR_ACTIVE}
    result = subprocess.run(command, env={**child_env, **env}, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("LEVER ")]
    if result.returncode or not lines:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"[{name}] skipped: {reason}", flush=True)
        return {"skipped": reason}
    row = json.loads(lines[-1][len("LEVER "):])
    print(f"[{name}] {row['images_per_s']:.2f} images/s, loss {row['mean_loss']:.4f} ({row['allocator']}, "
          f"{row['num_workers']} workers, {row['torch_threads']} threads)", flush=True)
    return row


def combine(runs: list[dict]) -> dict:
    """One lever's repeats: the median run's fields, with every images/s and the spread."""
    measured = [run for run in runs if "skipped" not in run]
    if not measured:
        return runs[0]
    rates = sorted(run["images_per_s"] for run in measured)
    median = statistics.median(rates)
    return {**min(measured, key=lambda run: abs(run["images_per_s"] - median)), "images_per_s": median,
            "all_images_per_s": [run["images_per_s"] for run in measured], "spread": (rates[-1] - rates[0]) / median}


def markdown(rows: dict[str, dict], args: argparse.Namespace) -> str:
    base = rows.get("default", {}).get("images_per_s")
    lines = [f"| lever | what changes | images/s (median of {args.repeats}) | spread | vs default | "
             f"mean loss ({args.steps} steps) | warm-up s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in rows.items():
        if "skipped" in row:
            lines.append(f"| {name} | {LEVERS[name][0]} | skipped: {row['skipped']} | | | | |")
            continue
        ratio = f"{row['images_per_s'] / base:.2f}x" if base else ""
        lines.append(f"| {name} | {LEVERS[name][0]} | {row['images_per_s']:.2f} | {row.get('spread', 0):.0%} | {ratio} | "
                     f"{row['mean_loss']:.4f} | {row['warmup_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder (its config and training split are used)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per lever")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiling happens here)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the levers; the median is reported")
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(LEVERS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every lever (repeatable)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--md", help="write the Markdown table here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print("LEVER " + json.dumps(measure_one(args.run, json.loads(args.child), args.warmup, args.steps)), flush=True)
        return
    names = [name for name in args.only.split(",") if name] if args.only is not None else list(LEVERS)
    unknown = [name for name in names if name not in LEVERS]
    if unknown or not names or args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.exit(2, f"error: --only: expected any of {', '.join(LEVERS)}; got {args.only!r}\n" if unknown or not names
                    else "error: --steps and --repeats must be at least 1, --warmup at least 0\n")
    RunDir(args.run).load_model()  # a missing run is named here, once
    try:
        load_config(RunDir(args.run).config, args.set)
    except ConfigError as exc:
        raise ConfigError(f"--set: {exc}") from None
    for path in (args.json, args.md):
        if path and not Path(path).resolve().parent.is_dir():
            raise ConfigError(f"{path}: its folder does not exist")
    torch.set_num_threads(1)  # the parent only waits
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            if not runs[name] or "skipped" not in runs[name][0]:
                runs[name].append(measure_lever(name, args))
    rows = {name: combine(measured) for name, measured in runs.items()}
    table = markdown(rows, args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"run": args.run, "steps": args.steps, "warmup": args.warmup,
                                               "repeats": args.repeats,
                                               "set": args.set, "machine": describe_machine(), "rows": rows}, indent=2))
    if args.md:
        Path(args.md).write_text(table)


if __name__ == "__main__":
    sys.exit(run_cli(main))
