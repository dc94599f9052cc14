"""Two machines simulated on loopback: two `accelerate launch` commands, machine_rank 0 and 1, one CPU process each.

Each machine gets its own output dir (no shared file system) or both get the same one (shared),
and the result is compared with a two-process run on one machine with the same seed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import psutil
import pytest

from conftest import REPO, TINY_TRAINING, free_port
from kvseg.data.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow

TWO_MACHINES = REPO / "configs/accelerate/two_machines_cpu.yaml"
ONE_MACHINE = REPO / "configs/accelerate/cpu_2proc.yaml"
# One torch thread per process: each simulated machine has one of the two cores, and the reference
# run gives each of its processes the same.
ARGS = ["--epochs", "2", "--run-name", "r", "--set", "train.cpu_threads=1", "--set", "train.scheduler=none", *TINY_TRAINING]
TIMEOUT = 240


@pytest.fixture(scope="module")
def odd_split_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 images, 5 of them test: two processes get 3 + 3 test images, one of them a repeat to drop."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "odd", num_images=20, size=64, test_fraction=0.25,
                                   seed=5)


def _launch(config: Path, *args: str, machine_rank: int | None = None, port: int | None = None) -> list[str]:
    command = ["accelerate", "launch", "--config_file", str(config)]
    if machine_rank is not None:
        command += ["--machine_rank", str(machine_rank), "--main_process_port", str(port)]
    return [*command, str(REPO / "train_ddp.py"), *args]


def run_two_machines(machine_args: tuple[list[str], list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start machine 0 and machine 1 at once, as two shells would, and wait for both."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = [
        subprocess.Popen(_launch(TWO_MACHINES, *args, machine_rank=rank, port=port), cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank, args in enumerate(machine_args)
    ]
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:  # a machine left waiting for its peer is stopped with everything it started
            if process.poll() is None:
                tree = [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]
                for member in tree:
                    member.kill()
                psutil.wait_procs(tree, timeout=30)
    return results


def train_on_two_machines(data: Path, output_dirs: tuple[Path, Path], cwd: Path) -> list[subprocess.CompletedProcess]:
    results = run_two_machines(tuple(["--data-dir", str(data), "--output-dir", str(out), *ARGS] for out in output_dirs),
                               cwd=cwd)
    for rank, result in enumerate(results):
        assert result.returncode == 0, (rank, result.stderr[-3000:])
    return results


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def one_machine_metrics(odd_split_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("one_machine")
    result = subprocess.run(_launch(ONE_MACHINE, "--data-dir", str(odd_split_root), "--output-dir", str(out), *ARGS),
                            cwd=out, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return _results(out / "r")


def _results(run_dir: Path) -> dict:
    """metrics.json with the per-image rows of per_image.csv, keyed by split then id."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["rows"] = {}
    for row in csv.DictReader((run_dir / "per_image.csv").read_text().splitlines()):
        metrics["rows"].setdefault(row["split"], []).append((row["id"], float(row["iou"])))
    return metrics


def assert_same_metrics(metrics: dict, reference: dict, test_ids: list[str]) -> None:
    test = metrics["test"]
    assert test["num_images"] == len(test_ids) == 5
    assert sorted(i for i, _ in metrics["rows"]["test"]) == sorted(test_ids)  # every test image scored, each once
    assert sum(test["confusion_matrix"].values()) == len(test_ids) * 64 * 64
    assert test["confusion_matrix"] == reference["test"]["confusion_matrix"]
    assert test["loss"] == pytest.approx(reference["test"]["loss"], abs=1e-6)
    got, expected = sorted(metrics["rows"]["test"]), sorted(reference["rows"]["test"])
    assert [i for i, _ in got] == [i for i, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], abs=1e-9)
    assert metrics["test_tta"]["confusion_matrix"] == reference["test_tta"]["confusion_matrix"]
    assert metrics["selection"] == reference["selection"]


def test_two_machines_without_a_shared_file_system(odd_split_root: Path, one_machine_metrics: dict, tmp_path: Path) -> None:
    main, second = tmp_path / "machine0", tmp_path / "machine1"
    results = train_on_two_machines(odd_split_root, (main, second), cwd=tmp_path)
    for result in results:  # each machine logs through its own local main process
        assert "2 process(es)" in result.stdout
        assert sum(line.startswith("Epoch [2/2], Average Loss: ") for line in result.stdout.splitlines()) == 1

    run_dir = main / "r"
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["num_processes"] == 2
    test_ids = (odd_split_root / "test.txt").read_text().split()
    assert_same_metrics(_results(run_dir), one_machine_metrics, test_ids)
    for name in ("config.yaml", "history.json", "index.html", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    # Each machine keeps the training state of its own processes: model, optimizer, scheduler, progress
    # and its RNG state, so that it can resume from its own disk.
    assert sorted(p.name for p in (run_dir / "checkpoints" / "state").glob("random_states_*")) == ["random_states_0.pkl"]
    # Machine 1 keeps a resume copy and nothing else: no checkpoints to use, no metrics, no report, no litter.
    copy = files_under(second / "r")
    assert {"config.yaml", "train.txt", "val.txt", "test.txt", "checkpoints/state/progress.json",
            "checkpoints/state/random_states_1.pkl"} <= copy
    assert not {name for name in copy if name.endswith((".json", ".html", ".png", ".csv", ".pt", ".tmp"))
                or "state.tmp" in name or "state.old" in name} - {"environment.json", "checkpoints/state/progress.json"}
    assert "random_states_0.pkl" not in {Path(name).name for name in copy}


def test_two_machines_resume_each_from_its_own_disk(odd_split_root: Path, one_machine_metrics: dict,
                                                    tmp_path: Path) -> None:
    """One epoch on two machines without a shared file system, then --resume on both for the second:
    the result equals an uninterrupted two-epoch run."""
    outputs = (tmp_path / "machine0", tmp_path / "machine1")
    first = ["--epochs", "1", *ARGS[2:]]  # ARGS starts with --epochs 2
    for rank, result in enumerate(run_two_machines(tuple(["--data-dir", str(odd_split_root), "--output-dir", str(out),
                                                          *first] for out in outputs), cwd=tmp_path)):
        assert result.returncode == 0, (rank, result.stderr[-3000:])
    resumed = run_two_machines(tuple(["--resume", str(out / "r"), "--epochs", "2"] for out in outputs), cwd=tmp_path)
    for rank, result in enumerate(resumed):
        assert result.returncode == 0, (rank, result.stderr[-3000:])
        assert "Resumed from" in result.stdout and "Epoch [1/2]" not in result.stdout
    test_ids = (odd_split_root / "test.txt").read_text().split()
    assert_same_metrics(_results(outputs[0] / "r"), one_machine_metrics, test_ids)


def test_two_machines_sharing_the_output_dir(odd_split_root: Path, one_machine_metrics: dict, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    train_on_two_machines(odd_split_root, (shared, shared), cwd=tmp_path)
    assert sorted(p.name for p in shared.iterdir()) == ["r"]
    run_dir = shared / "r"
    test_ids = (odd_split_root / "test.txt").read_text().split()
    assert_same_metrics(_results(run_dir), one_machine_metrics, test_ids)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt", "state"]  # no state.tmp left
    assert sorted(p.name for p in (checkpoints / "state").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_an_error_on_the_second_machine_is_printed_there(odd_split_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    main, second = run_two_machines((["--data-dir", str(odd_split_root), "--output-dir", str(tmp_path), *ARGS],
                                     ["--data-dir", str(missing), "--output-dir", str(tmp_path), *ARGS]), cwd=tmp_path)
    assert second.returncode != 0 and main.returncode != 0  # machine 0 loses its peer
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {missing}: dataset folder not found (expected images/ and masks/ inside)"], second.stderr
