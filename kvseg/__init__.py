"""kvseg: train, export and benchmark segmentation models for endoscopy images (instruments, polyps)."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# The CPU cores this process may run on, read when kvseg is first imported, before torch: with an OpenMP
# binding (OMP_PROC_BIND, OMP_PLACES, GOMP_CPU_AFFINITY, KMP_AFFINITY) torch's OpenMP runtime pins the main
# thread to one core as it starts, after which the main thread's affinity mask says one core
# (kvseg.runtime.usable_cores). None where it cannot be read, or where torch was loaded first.
START_AFFINITY: frozenset[int] | None = (
    frozenset(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") and "torch" not in _sys.modules else None
)
