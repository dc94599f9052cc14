"""A launch that asked for several processes or machines but formed no process group is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port
from kvseg.training.distributed import WORLD_SIZE_VARIABLES, ProcessGroupError, check_process_group

LAUNCHER_VARIABLES = ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", *WORLD_SIZE_VARIABLES)
# What accelerate's simple launcher puts into the process it starts for
# `accelerate launch --cpu --num_machines 2 --num_processes 2 --main_process_ip 127.0.0.1 --main_process_port 29611`
# (printed from inside such a process; accelerate/utils/launch.py prepare_simple_launcher_cmd_env).
SIMPLE_LAUNCHER_ENV = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29611"}


@pytest.fixture()
def launcher_env(monkeypatch: pytest.MonkeyPatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def test_simple_launcher_asked_for_several_processes(launcher_env) -> None:
    launcher_env(**SIMPLE_LAUNCHER_ENV)
    with pytest.raises(ProcessGroupError) as raised:
        check_process_group(1)
    message = str(raised.value)
    assert "\n" not in message
    assert "MASTER_ADDR=127.0.0.1" in message and "1 member" in message
    assert "configs/accelerate/two_machines_cpu.yaml" in message and "use_cpu: true" in message


def test_world_size_larger_than_the_group(launcher_env) -> None:
    launcher_env(WORLD_SIZE="4", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    with pytest.raises(ProcessGroupError, match="started 4 processes"):
        check_process_group(1)


@pytest.mark.parametrize(("env", "num_processes"), [
    ({}, 1),  # python train_ddp.py
    ({"ACCELERATE_USE_CPU": "True"}, 1),  # accelerate launch --cpu --num_processes 1
    ({"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}, 1),  # python train_ddp.py in a shell that exports them
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", **SIMPLE_LAUNCHER_ENV}, 2),  # torchrun: cpu_2proc.yaml, two_machines_cpu.yaml
    ({"WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, 1),  # torchrun with one process
])
def test_legitimate_launches_pass(launcher_env, env: dict, num_processes: int) -> None:
    launcher_env(**env)
    check_process_group(num_processes)


def _only_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_cpu_multi_machine_launch_stops_instead_of_training_alone(synthetic_root: Path, tmp_path: Path) -> None:
    # Machine rank 0 of `--cpu --num_machines 2`: without the check it trains a one-process run of its own.
    command = ["accelerate", "launch", "--cpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", "0",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
               str(REPO / "train_ddp.py"), "--data-dir", str(synthetic_root), "--output-dir", str(tmp_path / "runs")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]  # the launcher's status; its traceback names the script's
    assert "returned non-zero exit status 2" in result.stderr
    line = _only_error_line(result.stderr)
    assert "asked for several processes or machines" in line and "1 member" in line
    assert "two_machines_cpu.yaml" in line
    assert "Epoch [" not in result.stdout and not (tmp_path / "runs").exists()


def test_training_process_of_that_launch_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}, **SIMPLE_LAUNCHER_ENV}
    # A data dir that does not exist: a program without the check stops on it at once, with another message.
    result = subprocess.run([sys.executable, str(REPO / "train_ddp.py"), "--data-dir", str(tmp_path / "no-data"),
                             "--output-dir", str(tmp_path / "runs")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "1 member" in lines[0]
    assert not (tmp_path / "runs").exists()
