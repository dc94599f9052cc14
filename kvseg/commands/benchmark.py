"""Benchmark a trained run: the command behind ``benchmark.py`` and ``kvseg benchmark``.

PyTorch vs ONNX Runtime latency, IoU parity, training speed:

    python benchmark.py                          # newest run under runs/, every backend that loads here
    python benchmark.py --full                   # the long form: more timed calls and steps
    python benchmark.py --run runs/NAME --batch-sizes 1,8 --iters 50 --warmup 10
    python benchmark.py --backends torch-fp32,ort-fp32,ort-int8 --train-steps 0 --json bench.json
    python benchmark.py --run runs/NAME --backends ort-fp32,ort-int8 --train-steps 0 --video   # + 720p video row
    python benchmark.py --run runs/NAME --backends torch-fp32 --train-steps 0 --loader-seconds 0   # latency, parity

Exports the run's ONNX models first when they are missing. Prints the tables and writes
RUN_DIR/benchmark.json and RUN_DIR/benchmark.md (plus --json / --markdown copies).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.markdown import Markdown

from kvseg.bench.report import to_markdown
from kvseg.bench.run import benchmark_run
from kvseg.bench.training import DEFAULT, FULL, Budget
from kvseg.deploy.backends import BACKENDS, MODEL_PRECISION
from kvseg.deploy.export import export_run
from kvseg.errors import KvsegError
from kvseg.files import write_json, write_text
from kvseg.runs.folder import RunDir, latest_run

logger = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes, got {text!r}")
    return values


def _backends(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (the docs' commands are checked against them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run folder (default: the newest under --runs-dir)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--backends", type=_backends, default=list(BACKENDS), help=f"subset of {','.join(BACKENDS)}")
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 8], help="comma-separated (default 1,8)")
    parser.add_argument("--full", action="store_true",
                        help="the long form: about four times the timed calls and steps, a whole warm-up epoch")
    parser.add_argument("--iters", type=int, help="timed calls per backend and batch size (default: sized to the latency)")
    parser.add_argument("--warmup", type=int, help="untimed calls and training steps first (default 3; --full 5)")
    parser.add_argument("--train-steps", type=int,
                        help="timed training steps per loop (default: sized to about 15 s; --full 60 s); 0: skip training")
    parser.add_argument("--video", type=int, nargs="?", const=250, default=0, metavar="FRAMES",
                        help="add the end-to-end video row: a 720p clip of FRAMES frames (default 250) per backend")
    parser.add_argument("--loader-seconds", type=float,
                        help="data loading alone (images/s per worker at the run's size and 512, with and without the "
                             "disk cache): seconds per measurement (default 2; --full 6); 0: skip")
    parser.add_argument("--data-dir", help="dataset folder, when it moved since training")
    parser.add_argument("--json", help="also write the JSON report here")
    parser.add_argument("--markdown", help="also write the Markdown report here")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


def budget_of(args: argparse.Namespace) -> Budget:
    """The measurement budget: the default or ``--full``, with ``--iters``, ``--warmup`` and ``--train-steps`` exact."""
    budget = FULL if args.full else DEFAULT
    if args.iters is not None:
        budget = replace(budget, min_iters=args.iters, max_iters=args.iters)
    if args.warmup is not None:
        budget = replace(budget, warmup_steps=args.warmup)
    if args.loader_seconds is not None:
        budget = replace(budget, loader_seconds=args.loader_seconds)
    if args.train_steps:
        budget = replace(budget, train_seconds=0.0, min_steps=args.train_steps,
                         phase_steps=min(budget.phase_steps, args.train_steps),
                         profile_steps=min(budget.profile_steps, args.train_steps))
    return budget


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (args.iters is not None and args.iters < 1) or min(args.warmup or 0, args.train_steps or 0, args.video) < 0:
        raise KvsegError("--iters must be at least 1, --warmup, --train-steps and --video at least 0")
    if args.loader_seconds is not None and not 0 <= args.loader_seconds < 3600:  # also refuses nan and inf
        raise KvsegError(f"--loader-seconds is {args.loader_seconds}; expected seconds from 0 (skip) to under 3600")
    budget = budget_of(args)
    console = Console()
    run = RunDir(args.run) if args.run else latest_run(args.runs_dir)
    needed = {MODEL_PRECISION[b] for b in args.backends if b in MODEL_PRECISION}
    if any(not run.onnx(p).is_file() for p in needed):
        run.load_model()  # a missing run or checkpoint is named before anything is exported
        console.print(f"exporting ONNX models of {run} first")
        export_run(run.best, run.onnx("fp32"), run_dir=run.path, precisions=tuple(sorted(needed | {"fp32"})),
                   data_dir=args.data_dir)
    report = benchmark_run(run, args.backends, args.batch_sizes, budget, train=args.train_steps != 0,
                           data_dir=args.data_dir,
                           video_frames=args.video, loader=budget.loader_seconds > 0)
    markdown = to_markdown(report)
    console.print(Markdown(markdown))
    for json_path in [run.benchmark_json, *([Path(args.json)] if args.json else [])]:
        write_json(json_path, report)
    for md_path in [run.benchmark_md, *([Path(args.markdown)] if args.markdown else [])]:
        write_text(md_path, markdown)
    console.print(f"wrote {run.benchmark_json} and {run.benchmark_md}")
    if report["flagged"]:
        console.print(f"[bold red]parity flagged: {', '.join(report['flagged'])}[/bold red]")

