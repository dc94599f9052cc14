"""Export a trained kvseg run to a verified ONNX model (the command is :mod:`kvseg.commands.export`).

    python export.py                                   # best checkpoint of the newest run under runs/
    python export.py --run runs/20260101-120000 --fp16 --int8
    python export.py --checkpoint model.pt --output deploy/model.onnx --dynamic batch

Writes RUN_DIR/model.onnx (and model_fp16.onnx / model_int8.onnx), each verified against PyTorch
in ONNX Runtime before it is put in place, and RUN_DIR/export.json with the figures. Bad input ends
with one line ``error: ...`` and exit status 2.
"""

import sys

from kvseg.cli import run_cli
from kvseg.commands.export import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
