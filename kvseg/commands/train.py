"""Train a model on one or many GPUs, or CPU processes: the command behind ``train_ddp.py`` and ``kvseg train``.

    accelerate launch train_ddp.py
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml train_ddp.py --epochs 2
    accelerate launch --config_file configs/accelerate/gpu_all_bf16.yaml train_ddp.py --config configs/gpu_h100.yaml
    accelerate launch train_ddp.py --resume runs/20260101-120000
    accelerate launch train_ddp.py --run-name nightly --resume auto     # continue runs/nightly, or start it

With no dataset at data.root (``data/kvasir-instrument``) and no --data-dir, the synthetic stand-in
is written to ``data/synthetic-kvasir-instrument`` and used. After training, the main process
writes the run's figures and index.html (:func:`kvseg.evaluation.report.write_report`). Bad input
ends with one line ``error: ...`` and exit status 2 (``--debug`` shows the traceback); SIGUSR1 or
SIGTERM (preemption) with one line ``preempted: ...`` and exit status 75 once the resume state is
saved (:mod:`kvseg.training.stopping`).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from kvseg.cli import is_main_rank
from kvseg.commands.plan import budget_of, plan_folder
from kvseg.config import Config, load_config
from kvseg.errors import CheckpointError, ConfigError
from kvseg.evaluation.report import write_report
from kvseg.planning.planner import Plan
from kvseg.runs.folder import RunDir, open_run
from kvseg.training.factory import RunOptions
from kvseg.training.run import run_training
from kvseg.training.stopping import parse_duration

logger = logging.getLogger(__name__)


def planned(args: argparse.Namespace, precision: str) -> tuple[Plan, str]:
    """The plan of ``--plan auto`` for ``--data-dir`` and ``--budget``, and the mixed precision to train in.

    Raises:
        ConfigError: several processes were launched (each would probe on its own and plan apart), or no
            ``--data-dir`` was given.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--plan auto probes this machine in one process; with several, run python -m kvseg.plan "
                          "DATA_DIR --budget ... --out plan.yaml first, then --plan plan.yaml")
    if args.data_dir is None:
        raise ConfigError("--plan auto plans for a folder: pass --data-dir")
    data = load_config(args.config, args.set).data
    plan = plan_folder(args.data_dir, budget_of(args.budget), data)
    for line in plan.to_yaml().splitlines():
        logger.info(line)
    if precision == "auto" and plan.probe.device == "cpu" and plan.probe.native_bf16 and plan.probe.precision == "no":
        precision = "no"  # the probe found fp32 faster than the bf16 that auto would pick
    return plan, precision

FLAG_FIELDS = {
    "data_dir": "data.root",
    "output_dir": "output_dir",
    "run_name": "run_name",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "image_size": "data.image_size",
    "lr": "train.lr",
    "num_workers": "data.num_workers",
    "seed": "train.seed",
}


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (the docs' commands are checked against them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file overriding the defaults (see configs/)")
    parser.add_argument("--data-dir", help="dataset folder with images/ and masks/ (must exist)")
    parser.add_argument("--output-dir", help="where run folders are created (default runs/)")
    parser.add_argument("--run-name", help="run folder name (default: a time stamp)")
    parser.add_argument("--epochs", type=int, help="epochs to train; alone it turns the default budget off (with "
                                                   "--budget: the most epochs)")
    parser.add_argument("--budget", metavar="DURATION",
                        help="training + validation time, e.g. 30m, 1.5h, 90s (train.budget_minutes): the learning-rate "
                             "schedule runs on the fraction of it used, and training stops when it is spent")
    parser.add_argument("--batch-size", type=int, help="per process")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--num-workers", type=int, help="DataLoader worker processes per training process")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--plan", metavar="auto|FILE",
                        help="auto: plan the run for --data-dir, this machine and --budget first (python -m kvseg.plan, "
                             "about 30 s of probing); FILE: a plan written by python -m kvseg.plan")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last saved state (an epoch's end, or the step a "
                             "preemption stopped at); auto: the run folder --output-dir/--run-name when it holds one, "
                             "else start it there (what a requeued or restarted job runs)")
    parser.add_argument(
        "--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
        help="auto: the launcher's setting, or bf16 where it is native, on a GPU or a CPU (default)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, e.g. train.eval_every=2"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


def resumable_run(cfg: Config) -> str | None:
    """``--resume auto``: the run folder ``output_dir/run_name`` when it holds a state to resume from, else None
    (a new run is started there).

    Raises:
        ConfigError: there is no run name: an automatic resume needs a folder that every attempt names alike.
    """
    if not cfg.run_name:
        raise ConfigError("--resume auto needs --run-name (or run_name in the config): the run folder it continues, "
                          "or starts when that holds no saved state")
    run = RunDir(Path(cfg.output_dir) / cfg.run_name)
    try:
        run.state_dir()
    except CheckpointError:
        logger.info(f"--resume auto: {run} holds no saved state; starting the run there")
        return None
    return str(run)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in FLAG_FIELDS.items() if getattr(args, flag) is not None]
    resume, plan_given = args.resume, args.plan
    if resume == "auto":  # the run folder the flags name, when it holds a saved state; else a new run there
        resume = resumable_run(load_config(args.config or (plan_given if plan_given != "auto" else None),
                                           overrides + args.set))
        if resume and plan_given:
            logger.info(f"--resume auto: {resume} continues with the config it was planned with; --plan is not run")
            plan_given = None
    if args.epochs is not None and args.budget is None and not resume:
        overrides.append("train.budget_minutes=0")  # --epochs N alone: N epochs, however long they take
    if args.budget is not None:
        try:
            overrides.append(f"train.budget_minutes={parse_duration(args.budget)}")
        except ValueError as exc:
            raise ConfigError(f"--budget: {exc}") from None
    config_file, plan_text, precision = args.config, None, args.mixed_precision
    if plan_given and (args.config or resume):
        raise ConfigError("--plan writes the config of a new run; pass it without --config and --resume")
    if resume:  # a resumed run starts from its own config.yaml; flags and --set change it (kvseg.training.resume)
        config_file = open_run(resume).config
    elif plan_given == "auto":
        plan, precision = planned(args, precision)
        plan_text, overrides = plan.to_yaml(), plan.overrides + overrides
    elif plan_given:
        config_file = plan_given
    cfg = load_config(config_file, overrides + args.set)
    options = RunOptions(data_dir_given=args.data_dir is not None, resume=resume, mixed_precision=precision,
                         plan=plan_text)
    run = run_training(cfg, options)
    if is_main_rank():
        write_report(run)
        logger.info(f"Wrote {run}")
