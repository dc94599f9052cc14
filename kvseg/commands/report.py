"""The figures and the index.html of a run, from its folder and its best checkpoint.

    python -m kvseg.report RUN_DIR [--data-dir DIR]
    kvseg report RUN_DIR

Writes into RUN_DIR what :func:`kvseg.evaluation.report.write_report` lists; training writes the
same at the end of every run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kvseg.evaluation.report import write_report


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (the docs' commands are checked against them)."""
    parser = argparse.ArgumentParser(prog="python -m kvseg.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run folder written by train_ddp.py")
    parser.add_argument("--data-dir", help="dataset folder, when it moved since training")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for path in write_report(args.run_dir, args.data_dir):
        print(f"wrote {path}")
