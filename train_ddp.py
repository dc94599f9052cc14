"""Train a model on one or many GPUs, CPU processes or machines: ``accelerate launch train_ddp.py [--data-dir DIR]``.

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml train_ddp.py --epochs 2
    accelerate launch train_ddp.py --resume runs/20260101-120000

The command is :mod:`kvseg.commands.train`; ``python train_ddp.py --help`` lists its flags.
"""

from kvseg.allocator import reexec_with_allocator

if __name__ == "__main__":
    reexec_with_allocator()  # first, before torch loads: an allocator is chosen when a process starts

import sys

from kvseg.cli import run_cli
from kvseg.commands.train import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
