"""``kvseg <command> [arguments]``: every kvseg command under one name (also ``python -m kvseg``).

    kvseg train [--data-dir DIR] ...          the same as train_ddp.py
    kvseg export [--run RUN] [--int8] ...     the same as export.py
    kvseg benchmark [--run RUN] ...           the same as benchmark.py
    kvseg predict --onnx MODEL INPUTS --out DIR
    kvseg check DATA_DIR
    kvseg preprocess DATA_DIR [--image-size N]
    kvseg report RUN_DIR
    kvseg plan DATA_DIR [--budget 30m] [--out plan.yaml]

Several processes: ``accelerate launch [--config_file FILE] -m kvseg train ...``.
``kvseg COMMAND --help`` lists a command's flags.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from kvseg.allocator import benchmark_times_openvino, reexec_with_allocator

COMMANDS = {
    "train": ("kvseg.commands.train", "train a model (train_ddp.py)"),
    "export": ("kvseg.commands.export", "export a run to verified ONNX models (export.py)"),
    "benchmark": ("kvseg.commands.benchmark", "latency, parity and training speed of a run (benchmark.py)"),
    "predict": ("kvseg.commands.predict", "segment images and videos with a run or an ONNX model"),
    "check": ("kvseg.commands.check", "read every pair of a dataset folder and say what is there"),
    "preprocess": ("kvseg.commands.preprocess", "check a dataset folder and build its frame cache once, before training"),
    "report": ("kvseg.commands.report", "write a run's figures and index.html again"),
    "plan": ("kvseg.commands.plan", "plan a run for a folder, this machine and a time budget"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: kvseg COMMAND [ARGS]\n\ncommands:\n" + "\n".join(
        f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()) + "\n\nkvseg COMMAND --help shows its flags."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named by ``argv[0]``; returns the exit status (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name == "train":
        reexec_with_allocator()  # before torch loads, as train_ddp.py does
    elif name == "benchmark":
        reexec_with_allocator("OpenVINO backends are timed and crash under tcmalloc" if benchmark_times_openvino(rest) else "")
    from kvseg.cli import run_cli

    sys.argv[0] = f"kvseg {name}"  # argparse names the program after it
    return run_cli(importlib.import_module(COMMANDS[name][0]).main, rest)


if __name__ == "__main__":
    sys.exit(main())
