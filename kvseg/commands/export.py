"""Export a trained run to a verified ONNX model: the command behind ``export.py`` and ``kvseg export``.

    python export.py                                   # best checkpoint of the newest run under runs/
    python export.py --run runs/20260101-120000 --fp16 --int8
    python export.py --checkpoint model.pt --output deploy/model.onnx --dynamic batch

Writes RUN_DIR/model.onnx (and model_fp16.onnx / model_int8.onnx), each verified against PyTorch
in ONNX Runtime on the validation split before it is put in place, and RUN_DIR/export.json with the figures. Bad input ends
with one line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kvseg.deploy.export import export_run
from kvseg.deploy.onnx_model import DEFAULT_OPSET
from kvseg.errors import CheckpointError
from kvseg.files import write_json
from kvseg.runs.folder import RunDir, latest_run

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (the docs' commands are checked against them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run", help="run folder (default: the newest under --runs-dir)")
    source.add_argument("--checkpoint", help="a kvseg .pt checkpoint instead of a run folder")
    parser.add_argument("--runs-dir", default="runs", help="where to look for the newest run (default runs/)")
    parser.add_argument("--output", help="ONNX file to write (default RUN_DIR/model.onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--dynamic", choices=("all", "batch"), default="all",
                        help="dynamic axes: all (batch, height, width in multiples of the model's input multiple; default) "
                             "or batch only")
    parser.add_argument("--fp16", action="store_true", help="also write a fp16 model (for GPUs)")
    parser.add_argument("--int8", action="store_true", help="also write a static-int8 QDQ model (for CPUs)")
    parser.add_argument("--calibration-images", type=int, default=64,
                        help="training images for int8 calibration, a seeded sample of the training split (default 64)")
    parser.add_argument("--calibration-seed", type=int, default=0, help="the seed that draws them (default 0)")
    parser.add_argument("--data-dir", help="dataset folder, when it moved since training")
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check (not recommended)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run = None
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        if RunDir(checkpoint.parent.parent).config.is_file():
            run = RunDir(checkpoint.parent.parent)
        output = Path(args.output) if args.output else checkpoint.with_suffix(".onnx")
    else:
        run = RunDir(args.run) if args.run else latest_run(args.runs_dir)
        if not run.path.is_dir():
            raise CheckpointError(f"{run}: run folder not found")
        checkpoint = run.best
        output = Path(args.output) if args.output else run.onnx("fp32")
    if args.no_verify:
        print("warning: --no-verify: the models below are NOT checked against PyTorch", file=sys.stderr)
    logger.info(f"exporting {checkpoint}")
    precisions = ("fp32",) + ("fp16",) * args.fp16 + ("int8",) * args.int8
    report = export_run(
        checkpoint, output, run_dir=run.path if run else None, opset=args.opset, dynamic_hw=args.dynamic == "all",
        precisions=precisions, verify=not args.no_verify, data_dir=args.data_dir,
        calibration_images=args.calibration_images, calibration_seed=args.calibration_seed,
    )
    if run is not None:
        write_json(run.export_report, report.to_json())

