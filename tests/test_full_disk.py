"""A full disk loses nothing: every write kvseg makes keeps the previous file or folder whole, says so in one
line, and training stops (report figures go on without the one that failed).

The fast tests inject the error where the operating system would raise it (``ENOSPC``, ``EIO``); the slow
one fills a small tmpfs while a run is paused, where the machine allows a mount.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator

from conftest import REPO, TINY_TRAINING, cli_error, kvseg_messages
from kvseg.data.splits import Split, write_split
from kvseg.evaluation.report import FIGURES, write_report
from kvseg.files import WriteError, write_json
from kvseg.runs.folder import Progress, RunDir

NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _raise(exc: BaseException):
    """A stand-in for a system call that fails with ``exc``."""
    def fail(*args, **kwargs):
        raise exc
    return fail


def _failing_for(name: str, real):
    """``os.replace`` that fails as a full disk does when the target is called ``name``."""
    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise NO_SPACE
        return real(src, dst, *args, **kwargs)
    return replace


def test_a_write_that_fails_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"epoch": 1})
    monkeypatch.setattr(os, "replace", _failing_for("metrics.json", os.replace))
    with pytest.raises(WriteError) as raised:
        write_json(path, {"epoch": 2})
    assert str(raised.value) == f"{path}: cannot write (No space left on device); the previous file is kept"
    monkeypatch.setattr(os, "fsync", _raise(OSError(errno.EIO, os.strerror(errno.EIO))))
    with pytest.raises(WriteError, match="Input/output error"):
        write_json(path, {"epoch": 3})
    assert json.loads(path.read_text()) == {"epoch": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_split_files_of_a_run_are_written_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_split(Split(["a", "b"], ["c"], ["d"], "test"), tmp_path)
    monkeypatch.setattr(os, "replace", _failing_for("test.txt", os.replace))
    with pytest.raises(WriteError, match="test.txt: cannot write"):
        write_split(Split(["a"], ["c"], ["b", "d"], "test"), tmp_path)
    assert (tmp_path / "test.txt").read_text() == "d\n"


def _torch_save_on_a_full_disk(real):
    """``torch.save`` as it fails on a full disk: part of the file written, then PyTorch's RuntimeError."""
    def save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a zip archive")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")
    return save


@pytest.fixture()
def saved_state(tmp_path: Path) -> tuple[RunDir, Accelerator]:
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model = torch.nn.Linear(3, 1)
    accelerator.prepare(model, torch.optim.Adam(model.parameters()))
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    run.save_state(accelerator, Progress(epoch=1))
    return run, accelerator


@pytest.mark.parametrize("failure", ["torch.save", "safetensors", "fsync"])
def test_a_full_disk_while_saving_the_state_keeps_the_previous_one(saved_state: tuple[RunDir, Accelerator],
                                                                   failure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run, accelerator = saved_state
    before = {p.name: p.read_bytes() for p in (run.checkpoints / "state").iterdir()}
    if failure == "torch.save":
        monkeypatch.setattr(torch, "save", _torch_save_on_a_full_disk(torch.save))
    elif failure == "safetensors":
        import accelerate.utils.other

        monkeypatch.setattr(accelerate.utils.other, "safe_save_file", _raise(NO_SPACE))
    else:  # a file system that reports the full disk only when the data is flushed (NFS, delayed allocation)
        monkeypatch.setattr(os, "fsync", _raise(NO_SPACE))
    with pytest.raises(WriteError) as raised:
        run.save_state(accelerator, Progress(epoch=2))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{run.checkpoints / 'state.tmp'}: cannot save the training state (")
    assert "MiB free there" in message and message.endswith("; the previous state in checkpoints/state is kept")
    assert ("file write failed" if failure == "torch.save" else "No space left on device") in message
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["state"]  # nothing half-written left behind
    assert {p.name: p.read_bytes() for p in (run.checkpoints / "state").iterdir()} == before
    state, progress = run.load_progress()
    assert progress.epoch == 1
    monkeypatch.undo()
    accelerator.load_state(str(state))


def test_training_stops_in_one_line_when_the_state_cannot_be_saved(synthetic_root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import accelerate.checkpointing

    real_save, saves = accelerate.checkpointing.save_accelerator_state, []

    def full_on_the_second(*args, **kwargs):  # epoch 2's state meets a full disk
        saves.append(1)
        if len(saves) == 2:
            monkeypatch.setattr(torch, "save", _torch_save_on_a_full_disk(torch.save))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save_accelerator_state", full_on_the_second)
    monkeypatch.setattr("accelerate.accelerator.save_accelerator_state", full_on_the_second)
    message = cli_error("train_ddp", "--data-dir", str(synthetic_root), "--output-dir", str(tmp_path), "--run-name", "r",
                        "--epochs", "3", "--set", "eval.tta=[]", "--set", "data.num_workers=0", *TINY_TRAINING)
    run = RunDir(tmp_path / "r")
    assert message.startswith(f"error: {run.checkpoints / 'state.tmp'}: cannot save the training state (")
    assert "file write failed" in message and "previous state in checkpoints/state is kept" in message
    monkeypatch.undo()
    assert run.load_progress()[1].epoch == 1 and not (run.checkpoints / "state.tmp").exists()
    assert [h["epoch"] for h in json.loads(run.history.read_text())] == [1, 2]  # epoch 3 never started
    assert not run.metrics.exists()


def test_the_report_goes_on_without_a_figure_it_cannot_write(fresh_run: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    run_dir = Path(shutil.copytree(fresh_run, tmp_path / "run"))
    monkeypatch.setattr(os, "replace", _failing_for("pr_roc.png", os.replace))
    written = write_report(run_dir)
    assert sorted(p.name for p in written) == sorted([name for name in FIGURES if name != "pr_roc.png"] + ["index.html"])
    warnings = [m for m in kvseg_messages(caplog) if m.startswith("warning: ")]
    assert warnings == [f"warning: {run_dir / 'pr_roc.png'}: cannot write (No space left on device); nothing was "
                        "written; the report goes on without pr_roc.png"]
    assert 'src="pr_roc.png"' not in (run_dir / "index.html").read_text() and not (run_dir / "pr_roc.png.tmp").exists()


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.mark.slow  # a run of three epochs and its resume, about 40 s on two loaded cores
def test_a_disk_that_fills_during_a_run_loses_nothing(synthetic_root: Path, tmp_path: Path) -> None:
    """A real full disk: a 64 MiB tmpfs holds the run; after epoch 1 a file takes all but 64 KiB of it."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64m"):
        pytest.skip("this machine does not allow mounting a tmpfs (needs CAP_SYS_ADMIN); the fast tests inject ENOSPC")
    try:
        args = [sys.executable, str(REPO / "train_ddp.py"), "--data-dir", str(synthetic_root), "--output-dir", str(disk),
                "--run-name", "r", "--epochs", "3", "--set", "eval.tta=[]", *TINY_TRAINING]
        process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        run = RunDir(disk / "r")
        deadline = time.monotonic() + 180
        while not (run.checkpoints / "state" / "progress.json").is_file() and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        for member in tree:  # hold the run while the disk fills, so that epoch 2 meets it
            member.send_signal(signal.SIGSTOP)
        before = {p: p.read_bytes() for p in run.checkpoints.rglob("*") if p.is_file()}
        free = shutil.disk_usage(disk).free
        (disk / "balloon").write_bytes(b"\0" * max(0, free - 64 * 1024))
        for member in tree:
            member.send_signal(signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=180)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert process.returncode == 2, stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left on device" in lines[0], stderr
        assert "Epoch [2/3]" in stdout and "Epoch [3/3]" not in stdout
        after = {p: p.read_bytes() for p in run.checkpoints.rglob("*") if p.is_file()}
        assert after == before  # last.pt, best.pt and the state of epoch 1, byte for byte
        (disk / "balloon").unlink()
        resumed = subprocess.run([*args[:2], "--resume", str(run)], cwd=tmp_path, capture_output=True, text=True,
                                 timeout=240)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "Resumed from" in resumed.stdout and [h["epoch"] for h in json.loads(run.history.read_text())] == [1, 2, 3]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
