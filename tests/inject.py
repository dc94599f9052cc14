"""Run a kvseg script with one fault injected, for the fault tests; kvseg itself never imports this.

    KVSEG_TEST_FAULT=kill KVSEG_TEST_FAULT_STEP=3 KVSEG_TEST_FAULT_RANK=1 python tests/inject.py train_ddp.py ARGS

``KVSEG_TEST_FAULT`` names the fault, done by the process of rank ``KVSEG_TEST_FAULT_RANK`` (every
rank when unset) when it finishes optimizer step ``KVSEG_TEST_FAULT_STEP`` of the run:

* ``sigterm``, ``sigusr1``: the process signals itself, as a scheduler signals every process of a job;
* ``sigterm-launcher``: the process signals its parent, the launcher (``accelerate launch``, torchrun),
  as Kubernetes signals a container's first process;
* ``sigterm-twice``: ``sigterm``, and SIGTERM again while the resume state is being swapped in;
* ``kill``: SIGKILL (the out-of-memory killer, a lost machine); ``stop``: SIGSTOP (a machine that
  stops answering without closing its connections);
* ``corrupt``: the next image this rank's DataLoader workers read is truncated on disk first, so
  decoding it fails as a file damaged during the run does;
* ``disk-full``: the first write of ``checkpoints/last.pt`` fails with ENOSPC (no step needed).

The wall-clock time of the fault (``time.time()``) and the file it concerns go to the JSON file
``KVSEG_TEST_FAULT_LOG``. The script runs as ``__main__`` with the remaining arguments.
"""

from __future__ import annotations

import errno
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

FAULT = os.environ.get("KVSEG_TEST_FAULT", "")
STEP = int(os.environ.get("KVSEG_TEST_FAULT_STEP", "0"))
RANK = os.environ.get("KVSEG_TEST_FAULT_RANK")
LOG = Path(os.environ.get("KVSEG_TEST_FAULT_LOG", os.devnull))


def _log(**facts: object) -> None:
    if str(LOG) != os.devnull:
        LOG.write_text(json.dumps({"time": time.time(), "rank": os.environ.get("RANK", "0"), **facts}))


def _mine() -> bool:
    return RANK is None or os.environ.get("RANK", "0") == RANK


def _at_step(action) -> None:
    from kvseg.training.stopping import Control

    original = Control.after_step

    def after_step(self, counted: bool = True) -> bool:
        if _mine() and self.steps + counted == STEP:
            action()
        return original(self, counted)

    Control.after_step = after_step


def _signal(signum: int) -> None:
    _log(signal=signal.Signals(signum).name)
    os.kill(os.getpid(), signum)


def _corrupt_next_read() -> None:
    from kvseg.data.dataset import SegmentationDataset

    flag = LOG.with_suffix(".armed")
    original = SegmentationDataset.load

    def load(self, index: int):
        if flag.exists():  # the workers are other processes: the main process arms them through a file
            flag.unlink(missing_ok=True)
            path = Path(self.samples[index].image)
            path.write_bytes(path.read_bytes()[:200])
            _log(file=str(path))
        return original(self, index)

    SegmentationDataset.load = load
    _at_step(lambda: flag.write_text(""))


def _disk_full() -> None:
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "last.pt" and _mine():
            _log(file=str(dst))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    os.replace = replace


def _sigterm_twice() -> None:
    import kvseg.runs.folder

    original, signalled = kvseg.runs.folder.replace_folder, []

    def replace_folder(new, target) -> None:
        if signalled:
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler insists while the state is being swapped in
        original(new, target)

    kvseg.runs.folder.replace_folder = replace_folder
    _at_step(lambda: (signalled.append(1), _signal(signal.SIGTERM)))


FAULTS = {
    "sigusr1": lambda: _at_step(lambda: _signal(signal.SIGUSR1)),
    "sigterm-launcher": lambda: _at_step(lambda: (_log(signal="SIGTERM"), os.kill(os.getppid(), signal.SIGTERM))),
    "sigterm-twice": _sigterm_twice,
    "kill": lambda: _at_step(lambda: (_log(), os.kill(os.getpid(), signal.SIGKILL))),
    "stop": lambda: _at_step(lambda: (_log(), os.kill(os.getpid(), signal.SIGSTOP))),
    "corrupt": _corrupt_next_read,
    "disk-full": _disk_full,
}

if __name__ == "__main__":
    from kvseg.allocator import reexec_with_allocator

    reexec_with_allocator()  # as the script would, before the faults import torch: it re-runs this file
    if FAULT:
        FAULTS[FAULT]()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
