"""Segment your own images and videos with a trained run or an exported ONNX model.

    python -m kvseg.predict --run RUN_DIR INPUTS... --out DIR [--tta] [--batch-size 8]
    python -m kvseg.predict --onnx model.onnx INPUTS... --out DIR [--runtime openvino]
    python -m kvseg.predict --onnx model_int8.onnx procedure.mp4 --out DIR [--save-masks] [--smooth 0.5]
    python -m kvseg.predict --model realtime_cpu procedure.mp4 --out DIR --runtime openvino   # by recipe name
    kvseg predict --run RUN_DIR INPUTS... --out DIR

INPUTS are image files or folders of them. For each image, ``<stem>_mask.png`` (0/255, at the
image's shown size) and ``<stem>_overlay.png`` are written to DIR. The ONNX path needs only
ONNX Runtime and the ``kvseg.*`` metadata inside the model file, no checkpoint. Unreadable inputs
are listed and skipped; the command then ends with exit status 2, keeping everything it wrote.

Images are read upright (their EXIF orientation applied), so a mask matches the image as viewers
show it; hidden files in folders are left out; an image above Pillow's decompression-bomb limit is
refused unless ``--max-pixels N`` allows it. Video files, camera numbers and stream URLs are
segmented frame by frame (:mod:`kvseg.video.segment`). ``--model NAME`` runs the newest run under
``--runs-dir`` trained with the recipe ``configs/NAME.yaml`` (:mod:`kvseg.deploy.named`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from kvseg.deploy.named import named_predictor
from kvseg.deploy.predict import collect_inputs, onnx_predictor, predict_files, torch_predictor
from kvseg.errors import KvsegError
from kvseg.video.io import VideoError
from kvseg.video.pipeline import VideoOptions
from kvseg.video.segment import predict_videos, split_inputs

logger = logging.getLogger(__name__)


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of video inputs, for ``python -m kvseg.predict``."""
    group = parser.add_argument_group("video inputs (files, camera numbers, stream URLs)")
    group.add_argument("--save-masks", action="store_true", help="also write STEM_masks/frame_NNNNNN.png (0/255)")
    group.add_argument("--smooth", type=float, default=0.0, metavar="A",
                       help="average the probabilities over frames: A * previous + (1 - A) * new (0: off, e.g. 0.5)")
    group.add_argument("--video-batch-size", type=int, default=1, metavar="N", help="frames per model call (default 1)")
    group.add_argument("--caption", action="store_true", help="write the processing fps and latency into the overlay")
    group.add_argument("--max-frames", type=int, metavar="N", help="stop each video after N frames")


def video_options(args: argparse.Namespace) -> VideoOptions:
    """The :class:`VideoOptions` of parsed command-line flags.

    Raises:
        VideoError: a flag out of range.
    """
    if not 0 <= args.smooth < 1:
        raise VideoError(f"--smooth is {args.smooth}; expected 0 (off) up to but not including 1")
    if args.video_batch_size < 1 or (args.max_frames is not None and args.max_frames < 1):
        raise VideoError("--video-batch-size and --max-frames must be at least 1")
    return VideoOptions(batch_size=args.video_batch_size, smooth=args.smooth, tta=args.tta,
                        save_masks=args.save_masks, caption=args.caption, max_frames=args.max_frames)


def build_parser() -> argparse.ArgumentParser:
    """The command's flags (the docs' commands are checked against them)."""
    parser = argparse.ArgumentParser(prog="python -m kvseg.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder: uses its best checkpoint")
    source.add_argument("--onnx", help="a model written by export.py (needs no checkpoint)")
    source.add_argument("--model", metavar="NAME",
                        help="the model of recipe configs/NAME.yaml (e.g. realtime_cpu): the newest run of it under "
                             "--runs-dir, its int8 or fp32 ONNX model where exported, else its checkpoint")
    parser.add_argument("--runs-dir", default="runs", help="where --model looks for runs (default runs/)")
    parser.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="what runs an ONNX model (--onnx, --model): ONNX Runtime (default) or OpenVINO "
                             "(pip install -e \".[openvino]\")")
    parser.add_argument("inputs", nargs="+", help="image files or folders; video files, camera numbers, stream URLs")
    parser.add_argument("--out", required=True, help="folder for the masks and overlays")
    parser.add_argument("--tta", action="store_true", help="average over the 8 flips/rotations/transposes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-pixels", type=int, metavar="N",
                        help=f"read images of up to N pixels (default {Image.MAX_IMAGE_PIXELS:,}, Pillow's "
                             "decompression-bomb limit; 0: no limit)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    add_video_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = args.max_pixels or None
    videos, args.inputs = split_inputs(args.inputs)
    options = video_options(args)
    if args.run and args.runtime != "onnxruntime":
        raise KvsegError("--runtime applies to --onnx and --model; --run uses PyTorch")
    model = args.onnx or args.run
    if args.model:
        predictor, model = named_predictor(args.model, args.runs_dir, args.runtime)
        logger.info(f"--model {args.model}: {model}")
    else:
        predictor = torch_predictor(args.run) if args.run else onnx_predictor(args.onnx, args.runtime)
    files, problems = collect_inputs(args.inputs)
    written, unreadable = predict_files(predictor, files, Path(args.out), tta=args.tta, batch_size=args.batch_size)
    if files or not videos:
        print(f"wrote {len(written)} files for {len(written) // 2} image(s) to {args.out}")
    problems += unreadable
    messages = [f"{len(problems)} input(s) skipped: " + "; ".join(problems)] if problems else []
    messages += predict_videos(predictor, videos, Path(args.out), options, model=model)
    if messages:
        raise KvsegError("; ".join(messages))
