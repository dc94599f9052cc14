"""No hung ranks: an error on any process reaches every process within seconds, and a lost process is named.

Without help, a process that fails leaves the others waiting in their next collective until the
process group's timeout (the backends' default is 30 minutes), holding their GPUs. :class:`FaultWatch`
gives every process of a multi-process run a thread that, every :data:`PERIOD` seconds, beats (a
counter in the rendezvous store that ``torch.distributed`` already has) and looks for trouble:

* a *fault* in the store: the first process to fail writes its one-line message and exit status
  there (``compare_set``: the first one wins), and every other process prints that line and exits with
  that status — 2 for a user error (:class:`~kvseg.errors.KvsegError`), 1 otherwise;
* a *lost* process: rank 0 watches every other rank, the others watch rank 0. A process on this
  machine that has ended (the out-of-memory killer, SIGKILL) is lost at once; one whose beat has not
  moved for ``train.collective_timeout_s`` (a machine that froze or left the network) is lost then.
  The watcher writes the fault naming it;
* the store itself gone (it lives with rank 0's launcher, or rank 0): the first machine is gone.

The main thread does the same when an exception reaches it (:meth:`FaultWatch.fail`): a user error is
published as it is; any other exception (a collective that failed because a peer left) first looks
for its cause (a fault already written, a lost peer) for a few beats. Once a peer is gone the
process group cannot be shut down cleanly (gloo aborts in its destructor, "terminate called without
an active exception"), so a failing process prints its line, flushes its output and ends with
``os._exit``. The collectives themselves time out after ``train.collective_timeout_s`` too (the
process group's timeout, :func:`kvseg.training.factory.build_accelerator`); gloo raises "Timed out
waiting ... for recv operation to complete" then.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import NoReturn

import psutil
import torch.distributed as dist
from accelerate import Accelerator

from kvseg.errors import KvsegError, Preempted, user_message

PERIOD = 1.0  # seconds between beats, and between looks at the other processes
CAUSE_BEATS = 3  # beats an unexplained exception waits for its cause (a fault written, a peer that stopped beating)
READ_BEATS = 5  # beats rank 0 waits, after a fault, for every other process to have read it
FAULT_KEY, READ_KEY, PREFIX = "fault", "fault-read", "kvseg/faults/"


@dataclass(frozen=True)
class Fault:
    """What ends a run on every process alike: the one line printed after ``error:`` and the exit status."""

    message: str
    status: int  # 2: a user error, 1: anything else
    lost: int | None = None  # the rank it is about when that process is lost (it will not read the fault)


class FaultWatch:
    """While entered, the processes of a run watch each other (see the module docstring); one process: nothing.

    Leaving normally, or on :class:`~kvseg.errors.Preempted` (every process stops at the same step),
    waits for every process and stops the thread. Leaving on any other exception calls :meth:`fail`,
    which ends the process.

    Args:
        accelerator: the run's accelerator (rank, process count; the process group it formed).
        timeout_s: seconds without a beat after which a process is lost (``train.collective_timeout_s``).
        store: the store to meet in (default: ``torch.distributed``'s, under the prefix ``kvseg/faults/ATTEMPT/``,
            ATTEMPT being torchrun's restart count).
    """

    def __init__(self, accelerator: Accelerator, timeout_s: float, store: dist.Store | None = None) -> None:
        self.accelerator, self.timeout_s = accelerator, timeout_s
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.active = self.world > 1
        self._store, self._thread = store, None
        self._main = self._watch = store  # the connections of the main thread and of the watching thread
        self._stop, self._ending = threading.Event(), threading.Lock()
        self.closing = False  # the run is ending normally: peers that leave now are not lost
        self._beats: dict[int, int] = {}
        self._seen: dict[int, float] = {}
        self._processes: dict[int, dict] = {}

    # -- the run's side ----------------------------------------------------------------------

    def __enter__(self) -> FaultWatch:
        if self.active:
            # one namespace per attempt: torchrun --max-restarts starts the group again on the same store
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = self._store or dist.PrefixStore(f"{PREFIX}{attempt}/", dist.distributed_c10d._get_default_store())
            self._main, self._watch = store, _clone(store, self.timeout_s)
            me = psutil.Process()
            self._main.set(f"process/{self.rank}", json.dumps({"host": socket.gethostname(), "pid": me.pid,
                                                               "started": me.create_time()}))
            self._thread = threading.Thread(target=self._run, name="kvseg-fault-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, traceback_: object) -> None:
        if exc is None or isinstance(exc, Preempted):
            self.finish()
        else:
            self.fail(exc)

    def finish(self) -> None:
        """The run ends on every process: say so, wait for all (no store host leaves early), stop the thread."""
        if not self.active:
            return
        self.closing = True
        try:
            self._main.set(f"done/{self.rank}", "1")
            self.accelerator.wait_for_everyone()
        except Exception as exc:  # a peer failed at the very end
            self.fail(exc)
        self._stop.set()
        self._thread.join(timeout=10 * PERIOD)

    def fail(self, exc: BaseException) -> None:
        """End this process the way every process of the run ends: the first fault's line and status.

        A user error (:class:`~kvseg.errors.KvsegError`) is this process's fault. Any other exception
        waits up to :data:`CAUSE_BEATS` beats for a cause elsewhere (a fault another process wrote, a
        peer that ended or stopped beating); without one it is this process's own, printed with its
        traceback. From the start SIGTERM and SIGUSR1 are ignored: a launcher that saw another process
        end signals this one, which is ending anyway. Returns (letting ``exc`` propagate) only in a
        one-process run.
        """
        if not self.active:
            return
        self.closing = True  # the thread keeps quiet from here: this thread decides
        if threading.current_thread() is threading.main_thread():  # the launcher's SIGTERM must not cut the line short
            for stop in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(stop, signal.SIG_IGN)
        if isinstance(exc, KvsegError):
            fault = Fault(user_message(exc), 2)
            if "--debug" in sys.argv:
                traceback.print_exception(exc)
        else:
            fault = self._cause()
            if fault is None:
                traceback.print_exception(exc)
                lines = str(exc).strip().splitlines()
                fault = Fault(f"rank {self.rank}: {type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": "), 1)
        with contextlib.suppress(Exception):  # without a store, this process can only say its own fault
            fault = self._publish(self._main, fault)
        self._end(fault, self._main)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(PERIOD):
            now = time.monotonic()
            if now - last > 3 * PERIOD:  # this process was suspended (SIGSTOP, a paused job): so were the others
                self._seen = dict.fromkeys(self._seen, now)
            last = now
            try:
                self._watch.add(f"beat/{self.rank}", 1)
                fault = self._written(self._watch)
                if fault is None and not self.closing:
                    lost = self._lost(self._watch, now)
                    fault = self._publish(self._watch, lost) if lost else None
            except Exception as exc:
                if self.closing:
                    return
                fault = Fault(f"lost the rendezvous store at {os.environ.get('MASTER_ADDR', '?')}:"
                              f"{os.environ.get('MASTER_PORT', '?')} ({_first_line(exc)}): the first machine, or "
                              "the launcher or process of rank 0 that keeps it, is gone", 1)
            if fault is not None and not self.closing:
                self._end(fault, self._watch)

    # -- looking -------------------------------------------------------------------------------

    def _peers(self) -> list[int]:
        return [rank for rank in range(self.world) if rank != self.rank] if self.rank == 0 else [0]

    def _lost(self, store: dist.Store, now: float) -> Fault | None:
        """A watched peer that has ended on this machine, or whose beat has not moved for ``timeout_s``."""
        ended = self._any_ended(store)
        if ended:
            return ended
        for peer in self._peers():
            if store.check([f"done/{peer}"]):
                continue
            beats = store.add(f"beat/{peer}", 0)
            if beats != self._beats.get(peer):
                self._beats[peer], self._seen[peer] = beats, now
            elif now - self._seen.setdefault(peer, now) > self.timeout_s:
                return self._silent(store, peer, now)
        return None

    def _cause(self) -> Fault | None:
        """For an unexplained exception: a fault written, or a peer lost, within :data:`CAUSE_BEATS` beats."""
        with contextlib.suppress(Exception):
            start = {peer: self._main.add(f"beat/{peer}", 0) for peer in self._peers()}
            for _ in range(CAUSE_BEATS):
                fault = self._written(self._main) or self._any_ended(self._main)
                if fault:
                    return fault
                time.sleep(PERIOD)
            silent = [peer for peer, beats in start.items() if self._main.add(f"beat/{peer}", 0) == beats
                      and not self._main.check([f"done/{peer}"])]
            if silent:
                return self._written(self._main) or self._silent(self._main, silent[0], time.monotonic())
        return None

    def _silent(self, store: dist.Store, peer: int, now: float) -> Fault:
        """The fault of a peer whose beat stopped (for as long as this process has seen it still)."""
        quiet = now - self._seen.get(peer, now - CAUSE_BEATS * PERIOD)
        return Fault(f"rank {peer} ({self._where(store, peer)}) stopped answering: no beat for {quiet:.0f} s "
                     f"(train.collective_timeout_s is {self.timeout_s:.0f}); its machine or process froze, crashed or "
                     "left the network; every process stops, the last saved state is kept", 1, peer)

    def _any_ended(self, store: dist.Store) -> Fault | None:
        """The fault of the first watched peer on this machine whose process has ended."""
        for peer in self._peers():
            ended = None if store.check([f"done/{peer}"]) else self._ended(store, peer)
            if ended:
                return ended
        return None

    def _where(self, store: dist.Store, peer: int) -> str:
        if peer not in self._processes and store.check([f"process/{peer}"]):
            self._processes[peer] = json.loads(store.get(f"process/{peer}"))
        process = self._processes.get(peer)
        return f"process {process['pid']} on {process['host']}" if process else "process unknown"

    def _ended(self, store: dist.Store, peer: int) -> Fault | None:
        """The fault of ``peer`` when it ran on this machine and its process has ended (gone, or a zombie)."""
        where = self._where(store, peer)
        process = self._processes.get(peer)
        if process is None or process["host"] != socket.gethostname():
            return None
        try:
            found = psutil.Process(process["pid"])
            alive = found.create_time() == process["started"] and found.status() not in (psutil.STATUS_ZOMBIE,
                                                                                         psutil.STATUS_DEAD)
        except psutil.NoSuchProcess:
            alive = False
        return None if alive else Fault(f"rank {peer} ({where}) ended without a word (killed: the out-of-memory killer, "
                                        "SIGKILL, a crash); every process stops, the last saved state is kept", 1, peer)

    # -- telling ---------------------------------------------------------------------------------

    @staticmethod
    def _written(store: dist.Store) -> Fault | None:
        return Fault(**json.loads(store.get(FAULT_KEY))) if store.check([FAULT_KEY]) else None

    @staticmethod
    def _publish(store: dist.Store, fault: Fault) -> Fault:
        """Write ``fault`` unless another process wrote one first; the one that stands."""
        stood = store.compare_set(FAULT_KEY, "", json.dumps(asdict(fault)))
        return Fault(**json.loads(stood))

    def _end(self, fault: Fault, store: dist.Store) -> NoReturn:
        """Say the fault is read; print the line (on each machine's first process, as :func:`kvseg.cli.run_cli`
        does) and exit. Rank 0 first waits up to :data:`READ_BEATS` beats for the others to read it: the store
        may live in its process (a launch without torchrun's agent) and end with it."""
        with self._ending:  # the first caller ends the process; a second one waits for that
            with contextlib.suppress(Exception):
                store.add(READ_KEY, 1)
                readers, deadline = self.world - (fault.lost is not None), time.monotonic() + READ_BEATS * PERIOD
                while self.rank == 0 and store.add(READ_KEY, 0) < readers and time.monotonic() < deadline:
                    time.sleep(PERIOD / 10)
            if os.environ.get("LOCAL_RANK", "0").strip() in ("", "0"):
                print(f"error: {fault.message}", file=sys.stderr)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(fault.status)


def _clone(store: dist.Store, timeout_s: float) -> dist.Store:
    """A second connection to ``store`` for the thread (a blocked call on one does not block the other)."""
    try:
        clone = store.clone()
    except (AttributeError, RuntimeError, NotImplementedError):  # stores without clone (HashStore) are in-process
        return store
    clone.set_timeout(timedelta(seconds=timeout_s))
    return clone


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
