"""Preprocessing as a step: check a dataset folder and build its frame cache once, before training on it.

    python -m kvseg.preprocess DATA_DIR [--config FILE] [--set key=value ...] [--image-size N]
    kvseg preprocess DATA_DIR --image-size 512

Runs the folder check (:func:`kvseg.data.check.check_folder`), prints its summary, builds the disk
cache at the image size (``--image-size``, else ``data.image_size``) and records the outcome
(:mod:`kvseg.data.prepare`); training on the folder with the same settings then reuses all three
and decodes nothing. Exit status 0 when the folder can be trained on, 2 when it cannot.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kvseg.config import load_config
from kvseg.data.prepare import prepare_folder
from kvseg.errors import DatasetError


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (the docs' commands are checked against them)."""
    parser = argparse.ArgumentParser(prog="python -m kvseg.preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", help="dataset folder with images/ and masks/")
    parser.add_argument("--config", help="YAML config whose data section applies (image size, mask encoding, cache)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config field, e.g. data.mask_encoding=labels or data.cache_dir=/scratch/kvseg")
    parser.add_argument("--image-size", type=int, help="the size to cache at (default: data.image_size)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    overrides = [f"data.root={args.data_dir}", *([f"data.image_size={args.image_size}"] if args.image_size else [])]
    cfg = load_config(args.config, overrides + args.set)
    prepared = prepare_folder(args.data_dir, cfg.data)
    print("\n".join(prepared.report.lines()))
    source = "from its record (no file changed since)" if prepared.records_reused else "decoded every pair"
    print(f"Check: {source}; " + (f"record {prepared.record}" if prepared.record else "no record kept"))
    if not prepared.report.ok:
        raise DatasetError(f"{args.data_dir}: {len(prepared.report.errors)} problem(s) found; see above")
    print(prepared.cache_line or f"Cache: none (data.cache is {cfg.data.cache})")
    print(f"Outcome: {prepared.outcome}; training on this folder with these settings reuses it")
