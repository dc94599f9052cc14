"""Benchmark a trained kvseg run: PyTorch vs ONNX Runtime latency, IoU parity, training speed
(the command is :mod:`kvseg.commands.benchmark`).

    python benchmark.py                          # newest run under runs/, every backend that loads here
    python benchmark.py --full                   # the long form: more timed calls and steps
    python benchmark.py --run runs/NAME --batch-sizes 1,8 --iters 50 --warmup 10
    python benchmark.py --backends torch-fp32,ort-fp32,ort-int8 --train-steps 0 --json bench.json
    python benchmark.py --run runs/NAME --backends ort-fp32,ort-int8 --train-steps 0 --video   # + 720p video row
    python benchmark.py --run runs/NAME --backends torch-fp32 --train-steps 0 --loader-seconds 0   # latency, parity

Exports the run's ONNX models first when they are missing. Prints the tables and writes
RUN_DIR/benchmark.json and RUN_DIR/benchmark.md (plus --json / --markdown copies).
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
