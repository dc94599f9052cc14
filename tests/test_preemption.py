"""Preemption: SIGUSR1 or SIGTERM stops every rank after the same step, the resume state is saved whole
(a second signal during the save changes nothing), the run exits 75, and ``--resume auto`` continues to
the metrics of an uninterrupted run.

The signals come from ``tests/inject.py`` at a chosen optimizer step, so that the run is stopped
inside an epoch whatever the load on the machine.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate import Accelerator

from conftest import REPO, TINY_TRAINING, free_port
from kvseg.errors import EXIT_PREEMPTED
from kvseg.runtime import worker_ignores_stop_signals
from kvseg.training.stopping import Control, StopSignals

INJECT = REPO / "tests" / "inject.py"
TWO_CPU_PROCESSES = ["accelerate", "launch", "--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml")]
TIMEOUT = 300


def test_stop_signals_only_record_the_first_and_restore_the_handlers() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler insists: the first request stands, nothing else happens
        assert signals.received == "SIGUSR1"
        control = Control(Accelerator(cpu=True), total_steps=10, signals=signals)
        assert control.requested == "SIGUSR1" and control.after_step() and control.preempted
        assert control.reason is None and not control.stopped  # preempted is not the run's end
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_request_between_epochs_is_voted_on_and_a_skipped_step_is_not_counted() -> None:
    control = Control(Accelerator(cpu=True), total_steps=2)
    assert not control.vote()
    assert not control.after_step(counted=False) and control.steps == 0
    control.request_stop("test")
    assert control.vote() and control.preempted
    assert control.after_step() and control.steps == 1 and control.reason is None
    assert control.after_step() and control.reason == "epochs"  # the step limit of an epoch-based run


def _worker(results) -> None:
    worker_ignores_stop_signals(0)
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR1)
    results.put("alive")


def test_data_loader_workers_outlive_the_stop_signals() -> None:
    """Schedulers signal every process of a job; a worker that died of it would fail the step being finished."""
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()
    worker = context.Process(target=_worker, args=(results,))
    worker.start()
    worker.join(timeout=60)
    assert worker.exitcode == 0 and results.get() == "alive"


WORKER_OUTLIVES_ITS_LOADER = """
import torch
from torch.utils.data import DataLoader, TensorDataset
from kvseg.data.dataset import SegmentationDataset  # noqa: F401 (the import path training takes)
from kvseg.runtime import end_workers_at_exit, init_worker
end_workers_at_exit()
loader = DataLoader(TensorDataset(torch.zeros(8, 2)), batch_size=2, num_workers=1, persistent_workers=True,
                    worker_init_fn=init_worker)
for _ in loader:
    pass
KEEP = [iter(loader)]  # a persistent iterator alive at exit, as PyTorch 2.7 keeps a finished run's
print("done")
"""


def test_a_process_ends_though_its_workers_ignore_sigterm() -> None:
    """multiprocessing's exit handler ends workers with SIGTERM, which they ignore; without kvseg's handler this hangs."""
    done = subprocess.run([sys.executable, "-c", WORKER_OUTLIVES_ITS_LOADER], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done" and "Error" not in done.stderr, done.stderr


# -- end to end -------------------------------------------------------------------------------

ARGS = ["--epochs", "3", "--image-size", "64", "--batch-size", "2", *TINY_TRAINING[4:], "--set", "eval.tta=[]"]


def _train(launcher: list[str], data: Path, out: Path, name: str, fault: dict | None = None,
           script: Path = REPO / "train_ddp.py") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [*launcher, str(script)]
    if fault:
        env.update({f"KVSEG_TEST_FAULT{'_' + k.upper() if k != 'fault' else ''}": str(v) for k, v in fault.items()})
        env["KVSEG_TEST_FAULT_LOG"] = str(out / f"{name}.fault.json")
        command = [*launcher, str(INJECT), str(script)]
    result = subprocess.run([*command, "--data-dir", str(data), "--output-dir", str(out), "--run-name", name,
                             "--resume", "auto", *ARGS], cwd=out, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if fault:  # for the fault table in docs/distributed.md (pytest -s shows it)
        fault_time = json.loads((out / f"{name}.fault.json").read_text())["time"]
        print(f"\n[fault table] {fault['fault']} at step {fault['step']} ({' '.join(launcher[:2])}): "
              f"{time.time() - fault_time:.1f} s from the signal to the launch's end (load {os.getloadavg()[0]:.1f})")
    return result


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["test"]


def _progress(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "state" / "progress.json").read_text())


def _preempted_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(("preempted: ", "error: "))]
    assert len(lines) == 1 and lines[0].startswith("preempted: "), result.stderr[-3000:]
    return lines[0]


def _assert_same_run(run: Path, reference: Path) -> None:
    again, whole = _metrics(run), _metrics(reference)
    assert again["confusion_matrix"] == whole["confusion_matrix"]
    assert again["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    history, reference_history = (json.loads((r / "history.json").read_text()) for r in (run, reference))
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in reference_history], rel=1e-6)
    assert [h["lr"] for h in history] == pytest.approx([h["lr"] for h in reference_history], rel=1e-9)


@pytest.fixture(scope="module")
def one_process_reference(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("preempt1")
    result = _train([sys.executable], synthetic_root, out, "whole")
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "whole"


@pytest.mark.slow  # three trainings of 3 short epochs, about 60 s on two loaded cores
@pytest.mark.parametrize("fault", ["sigusr1", "sigterm-twice"])
def test_a_preempted_run_resumes_to_the_uninterrupted_metrics(one_process_reference: Path, synthetic_root: Path,
                                                              fault: str) -> None:
    out = one_process_reference.parent
    name = f"preempted-{fault}"
    # 11 optimizer steps per epoch: step 15 is inside epoch 2
    stopped = _train([sys.executable], synthetic_root, out, name, {"fault": fault, "step": 15})
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    line = _preempted_line(stopped)
    run = out / name
    assert line.startswith(f"preempted: {'SIGUSR1' if fault == 'sigusr1' else 'SIGTERM'}: every process stopped after "
                           f"step 15 (epoch 2, batch 4 of 11) and saved the resume state in {run / 'checkpoints' / 'state'}")
    assert line.endswith(f"continue with --resume {run} (or --resume auto --run-name {name})")
    progress = _progress(run)
    assert progress["epoch"] == 1 and progress["partial"]["batches"] == 4 and progress["control"]["steps"] == 15
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt", "state"]
    resumed = _train([sys.executable], synthetic_root, out, name)  # the same command, as a requeued job runs it
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "and 4 batches of epoch 2 (preempted)" in resumed.stdout and "Epoch [1/3]" not in resumed.stdout
    _assert_same_run(run, one_process_reference)


@pytest.mark.slow  # three trainings with two processes, about 90 s on two loaded cores
def test_two_processes_preempted_through_their_launcher_resume_exactly(synthetic_root: Path, tmp_path: Path) -> None:
    """SIGTERM to ``accelerate launch`` (what Kubernetes sends a container's first process): torchrun
    passes it to each training process's group; both stop after the same step, save and exit 75."""
    launcher = [*TWO_CPU_PROCESSES, "--main_process_port", str(free_port())]
    reference = _train(launcher, synthetic_root, tmp_path, "whole")
    assert reference.returncode == 0, reference.stderr[-3000:]
    stopped = _train(launcher, synthetic_root, tmp_path, "preempted", {"fault": "sigterm-launcher", "step": 8, "rank": 0})
    assert stopped.returncode != 0  # the launcher's own status: it was signalled itself (143)
    assert _preempted_line(stopped).startswith("preempted: SIGTERM: every process stopped after step ")
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    progress, state = _progress(tmp_path / "preempted"), tmp_path / "preempted" / "checkpoints" / "state"
    assert progress["partial"] and progress["control"]["steps"] >= 8  # inside epoch 2 (6 steps per epoch)
    assert sorted(p.name for p in state.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    resumed = _train(launcher, synthetic_root, tmp_path, "preempted")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(tmp_path / "preempted", tmp_path / "whole")
