"""Benchmark a trained run: ``python benchmark.py [--run RUN_DIR] [--full] [--video]``.

PyTorch, ONNX Runtime and OpenVINO latency, IoU parity and training speed; the command is
:mod:`kvseg.commands.benchmark`, ``python benchmark.py --help`` lists its flags.
"""

import sys

from kvseg.allocator import benchmark_times_openvino, reexec_with_allocator

if __name__ == "__main__":
    # first, before torch loads: an allocator is chosen when a process starts; OpenVINO crashes under tcmalloc
    reexec_with_allocator("OpenVINO backends are timed and crash under tcmalloc"
                          if benchmark_times_openvino(sys.argv[1:]) else "")

from kvseg.cli import run_cli
from kvseg.commands.benchmark import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
