"""The folder check: read every image/mask pair of a dataset and say what is there, before training on it.

    python -m kvseg.check DATA_DIR [--config FILE] [--set data.mask_encoding=labels ...]
    kvseg check DATA_DIR

Prints the summary of :func:`kvseg.data.check.check_folder`. Exit status 0 when the folder can be
trained on, 2 when it cannot.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kvseg.config import load_config
from kvseg.data.check import check_folder
from kvseg.errors import DatasetError


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (the docs' commands are checked against them)."""
    parser = argparse.ArgumentParser(prog="python -m kvseg.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="dataset folder with images/ and masks/")
    parser.add_argument("--config", help="YAML config whose data section applies (mask encoding, split seed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config field, e.g. data.mask_encoding=labels or data.foreground_values=[1,2]")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.set)
    report = check_folder(args.data_dir, cfg.data)
    print("\n".join(report.lines()))
    if not report.ok:
        raise DatasetError(f"{args.data_dir}: {len(report.errors)} problem(s) found; see above")
