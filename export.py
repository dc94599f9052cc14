"""Export a trained run to verified ONNX models: ``python export.py [--run RUN_DIR] [--fp16] [--int8]``.

The command is :mod:`kvseg.commands.export`; ``python export.py --help`` lists its flags.
"""

import sys

from kvseg.cli import run_cli
from kvseg.commands.export import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
