"""No hung ranks: a fault on one process of a two-process run (gloo) ends every process within seconds, with
the same one-line message and exit status; a killed or frozen process is named.

Most runs here start the two processes by hand, as two machines with one process each on loopback
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``... as any launcher sets them): no launcher stops the survivor
for us, each process's own status and output are seen, and both print their line. One run goes
through ``accelerate launch`` with ``cpu_2proc.yaml``. The faults come from ``tests/inject.py``. Each
test prints the seconds from the fault to the last exit (``pytest -s`` shows them; docs/distributed.md
has the table). ``train.collective_timeout_s`` is set far above the waits, so that only the fault path
can end the runs in time; the frozen-process test sets it low, as that is what it measures.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch.distributed as dist

from conftest import REPO, TINY_TRAINING, free_port
from kvseg.training.factory import process_group_timeout
from kvseg.training.faults import Fault, FaultWatch

SLOW = pytest.mark.slow  # each test is one short two-process run, 20-60 s on two loaded cores

INJECT = REPO / "tests" / "inject.py"
ARGS = ["--epochs", "3", "--image-size", "64", "--batch-size", "2", *TINY_TRAINING[4:], "--set", "eval.tta=[]",
        "--set", "data.cache=off"]
NEVER = ["--set", "train.collective_timeout_s=900"]  # far longer than any wait below: the timeout does not end these
WAIT = 240  # the most a test waits for a run (start-up under load included)


def _fault_env(out: Path, fault: str, step: int = 0, rank: int | None = None) -> dict:
    env = {"KVSEG_TEST_FAULT": fault, "KVSEG_TEST_FAULT_STEP": str(step), "KVSEG_TEST_FAULT_LOG": str(out / "fault.json")}
    return {**env, "KVSEG_TEST_FAULT_RANK": str(rank)} if rank is not None else env


def _as_two_machines(args: list[str], out: Path, fault: dict) -> list[subprocess.Popen]:
    """Rank 0 and rank 1 as two one-process machines on loopback: each prints its own line."""
    port, processes = free_port(), []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **fault, "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        processes.append(subprocess.Popen([sys.executable, str(INJECT), str(REPO / "train_ddp.py"), *args], cwd=out, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return processes


def _wait(processes: list[subprocess.Popen]) -> tuple[list[subprocess.CompletedProcess], list[float]]:
    """Every process's result and the wall-clock time it ended; processes left after :data:`WAIT` are killed."""
    outputs, ended = [None] * len(processes), [0.0] * len(processes)
    deadline = time.monotonic() + WAIT
    try:
        while None in outputs and time.monotonic() < deadline:
            for i, process in enumerate(processes):
                if outputs[i] is None and process.poll() is not None:
                    ended[i] = time.time()
                    outputs[i] = subprocess.CompletedProcess(process.args, process.returncode, *process.communicate())
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.poll() is None:
                for member in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
                    member.kill()
    assert None not in outputs, "a process was still running after the fault: it hung"
    return outputs, ended


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def _fault(out: Path) -> dict:
    return json.loads((out / "fault.json").read_text())


def _report(what: str, fault: dict, ended: list[float]) -> None:
    print(f"\n[fault table] {what}: {max(ended) - fault['time']:.1f} s from fault to the last exit "
          f"(load {os.getloadavg()[0]:.1f})")


@SLOW
def test_an_error_on_rank_0_at_checkpoint_time_ends_both_alike(synthetic_root: Path, tmp_path: Path) -> None:
    processes = _as_two_machines(["--data-dir", str(synthetic_root), "--output-dir", str(tmp_path), "--run-name", "r",
                                  *ARGS, *NEVER], tmp_path, _fault_env(tmp_path, "disk-full", rank=0))
    results, ended = _wait(processes)
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    expected = f"error: {last}: cannot write (No space left on device); nothing was written"
    for rank, result in enumerate(results):
        assert result.returncode == 2, (rank, result.stderr[-3000:])
        assert _error_lines(result) == [expected], (rank, result.stderr[-3000:])
    assert "Traceback" not in results[1].stderr
    _report("ENOSPC writing last.pt on rank 0", _fault(tmp_path), ended)


@SLOW
def test_a_rank_killed_mid_epoch_is_named_by_the_others(synthetic_root: Path, tmp_path: Path) -> None:
    processes = _as_two_machines(["--data-dir", str(synthetic_root), "--output-dir", str(tmp_path), "--run-name", "r",
                                  *ARGS, *NEVER], tmp_path, _fault_env(tmp_path, "kill", step=3, rank=1))
    results, ended = _wait(processes)
    assert results[1].returncode == -signal.SIGKILL
    killed = processes[1].pid
    assert results[0].returncode == 1, results[0].stderr[-3000:]
    assert _error_lines(results[0]) == [
        f"error: rank 1 (process {killed} on {socket.gethostname()}) ended without a word (killed: the out-of-memory "
        "killer, SIGKILL, a crash); every process stops, the last saved state is kept"], results[0].stderr[-3000:]
    assert "Traceback" not in results[0].stderr
    _report("SIGKILL of rank 1 at step 3", _fault(tmp_path), ended)


@SLOW
def test_a_rank_that_stops_answering_is_lost_within_the_collective_timeout(synthetic_root: Path, tmp_path: Path) -> None:
    """SIGSTOP: the process is alive and its connections open, as on a machine that froze or left the network."""
    timeout = 20
    processes = _as_two_machines(["--data-dir", str(synthetic_root), "--output-dir", str(tmp_path), "--run-name", "r",
                                  *ARGS, "--set", f"train.collective_timeout_s={timeout}"], tmp_path,
                                 _fault_env(tmp_path, "stop", step=3, rank=1))
    deadline = time.monotonic() + WAIT
    while processes[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = [time.time()]
    processes[1].kill()  # the frozen one, for the cleanup
    results, _ = _wait(processes)
    assert results[0].returncode == 1, results[0].stderr[-3000:]
    (line,) = _error_lines(results[0])
    assert line.startswith(f"error: rank 1 (process {processes[1].pid} on {socket.gethostname()}) stopped answering: "
                           "no beat for "), line
    assert f"(train.collective_timeout_s is {timeout})" in line
    fault = _fault(tmp_path)
    assert ended[0] - fault["time"] >= timeout - 2  # it waited for the timeout: a frozen peer may come back
    _report(f"SIGSTOP of rank 1 at step 3, train.collective_timeout_s={timeout}", fault, ended)


@SLOW
def test_an_error_in_rank_1s_data_loader_reaches_rank_0_through_the_launcher(dataset_copy: Path, tmp_path: Path) -> None:
    """``accelerate launch`` with cpu_2proc.yaml: the first process of the machine prints the line."""
    command = ["accelerate", "launch", "--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml"),
               "--main_process_port", str(free_port()), str(INJECT), str(REPO / "train_ddp.py"),
               "--data-dir", str(dataset_copy), "--output-dir", str(tmp_path), "--run-name", "r", *ARGS, *NEVER]
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **_fault_env(tmp_path, "corrupt", 3, rank=1)})
    (result,), ended = _wait([launcher])
    fault = _fault(tmp_path)
    assert result.returncode == 1  # the launcher's status when a process failed
    errors = _error_lines(result)
    assert len(errors) == 1 and errors[0].startswith(f"error: {fault['file']}: ") and "decode" in errors[0], result.stderr
    assert "exitcode: 2" in result.stderr  # the failing process's own status, in the launcher's summary
    assert not [line for line in result.stderr.splitlines() if line.startswith("[rank0]:") and "Error" in line]
    _report("a corrupt image read by rank 1's DataLoader worker (accelerate launch)", fault, ended)


# -- the watch's decisions, in this process (no thread: its end would end the test process) -----------


@pytest.mark.parametrize("seconds", [300, 600])  # 600 s is accelerate's own default, which it would not pass on
def test_the_collective_timeout_reaches_the_process_group(seconds: int) -> None:
    handler = process_group_timeout(seconds)
    assert abs(handler.to_kwargs()["timeout"].total_seconds() - seconds) < 1e-3


def _watch(rank: int, store: dist.Store, timeout_s: float = 5.0) -> FaultWatch:
    watch = FaultWatch(SimpleNamespace(process_index=rank, num_processes=2), timeout_s, store=store)
    watch._main = watch._watch = store
    return watch


def _register(store: dist.Store, rank: int, pid: int, host: str | None = None) -> None:
    started = psutil.Process(pid).create_time() if psutil.pid_exists(pid) else 0.0
    store.set(f"process/{rank}", json.dumps({"host": host or socket.gethostname(), "pid": pid, "started": started}))


def test_the_first_fault_stands_and_a_silent_or_ended_peer_is_lost() -> None:
    store = dist.HashStore()
    watch = _watch(0, store)
    _register(store, 1, os.getpid(), host="elsewhere")  # on another machine: only its beat tells
    assert watch._lost(store, now=100.0) is None  # first look: the beat is noted
    store.add("beat/1", 1)
    assert watch._lost(store, now=104.0) is None  # it moved
    assert watch._lost(store, now=108.0) is None  # still within the 5 s
    fault = watch._lost(store, now=109.5)
    assert fault.status == 1 and fault.message.startswith(f"rank 1 (process {os.getpid()} on elsewhere) stopped "
                                                          "answering: no beat for 6 s")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    _register(store, 1, child.pid)
    watch._processes.clear()
    child.wait()  # ended on this machine: lost at once, whatever its beat
    assert watch._lost(store, now=110.0).message.startswith(f"rank 1 (process {child.pid} on {socket.gethostname()}) "
                                                            "ended without a word")
    store.set("done/1", "1")  # a peer that finished is not lost
    assert watch._lost(store, now=200.0) is None
    first = watch._publish(store, Fault("a.png: cannot decode", 2))
    assert first == watch._publish(store, Fault("rank 0: RuntimeError: Connection closed by peer", 1)) == _watch(
        1, store)._written(store) == Fault("a.png: cannot decode", 2)
