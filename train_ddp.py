"""Train a model on one or many GPUs, or CPU processes (the command is :mod:`kvseg.commands.train`).

    accelerate launch train_ddp.py
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml train_ddp.py --epochs 2
    accelerate launch --config_file configs/accelerate/gpu_all_bf16.yaml train_ddp.py --config configs/gpu_h100.yaml
    accelerate launch train_ddp.py --resume runs/20260101-120000

With no dataset at data.root (``data/kvasir-instrument``) and no --data-dir, the synthetic stand-in
is written to ``data/synthetic-kvasir-instrument`` and used. Bad input ends with one line
``error: ...`` and exit status 2 (``--debug`` shows the traceback).
"""

from kvseg.allocator import reexec_with_allocator

if __name__ == "__main__":
    reexec_with_allocator()  # first, before torch loads: an allocator is chosen when a process starts

import sys

from kvseg.cli import run_cli
from kvseg.commands.train import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
