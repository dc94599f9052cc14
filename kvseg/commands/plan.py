"""Plan a run for a folder, a machine and a time budget: ``python -m kvseg.plan DATA_DIR [--budget 30m] [--out plan.yaml]``.

Runs the folder check, probes this machine for about 30 seconds (training steps for the candidate
image sizes, widths, memory layouts and thread counts) and writes a config file that says why each
value was chosen and how many epochs should fit in the budget (:mod:`kvseg.planning`). Train with it:

    accelerate launch train_ddp.py --config plan.yaml --data-dir DATA_DIR
    accelerate launch train_ddp.py --plan auto --budget 30m --data-dir DATA_DIR     # plan and train in one
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from kvseg.config import DataConfig, load_config
from kvseg.data.check import check_folder
from kvseg.errors import ConfigError, DatasetError
from kvseg.files import write_text
from kvseg.planning.fingerprint import Fingerprint
from kvseg.planning.planner import WIDTHS, Plan, candidate_sizes, make_plan
from kvseg.planning.probe import probe
from kvseg.training.stopping import parse_duration

logger = logging.getLogger(__name__)
DEFAULT_BUDGET = "30m"


def plan_folder(data_dir: str | Path, budget_minutes: float, data: DataConfig | None = None,
                probe_seconds: float = 30.0) -> Plan:
    """Check ``data_dir``, probe this machine and plan a run of ``budget_minutes``.

    Raises:
        DatasetError: the folder check found errors (they are named).
    """
    report = check_folder(data_dir, data or DataConfig())
    if not report.ok:
        raise DatasetError(report.error_line())
    fingerprint = Fingerprint.of(report)
    for line in fingerprint.lines():
        logger.info(line)
    candidates = [(size, width) for size in candidate_sizes(fingerprint) for width in WIDTHS]
    logger.info(f"probing {len(candidates)} image size / width candidates for about {probe_seconds:.0f} s")
    return make_plan(fingerprint, probe(candidates, probe_seconds), budget_minutes)


def budget_of(text: str | None) -> float:
    """Minutes of a ``--budget`` value (default :data:`DEFAULT_BUDGET`).

    Raises:
        ConfigError: not a duration.
    """
    try:
        return parse_duration(text or DEFAULT_BUDGET)
    except ValueError as exc:
        raise ConfigError(f"--budget: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (the docs' commands are checked against them)."""
    parser = argparse.ArgumentParser(prog="python -m kvseg.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="dataset folder with images/ and masks/")
    parser.add_argument("--budget", metavar="DURATION", help=f"training + validation time (default {DEFAULT_BUDGET})")
    parser.add_argument("--out", help="where to write the plan (default: print it)")
    parser.add_argument("--config", help="YAML config whose data section applies (mask encoding, split seed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a data config field")
    parser.add_argument("--probe-seconds", type=float, default=30.0, help="how long to probe (default 30)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 1 <= args.probe_seconds <= 3600:
        raise ConfigError(f"--probe-seconds is {args.probe_seconds}; expected 1 to 3600")
    plan = plan_folder(args.data_dir, budget_of(args.budget), load_config(args.config, args.set).data, args.probe_seconds)
    text = plan.to_yaml()
    load_config(overrides=plan.overrides)  # the plan is a valid config
    if args.out:
        write_text(args.out, text)
        logger.info(f"wrote {args.out}")
    else:
        print(text, end="")
