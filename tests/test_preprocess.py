"""Preprocessing as a step: ``python -m kvseg.preprocess`` checks and caches once; training reuses both."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest

import kvseg.data.prepare
import kvseg.data.preprocessed
from kvseg.__main__ import COMMANDS
from kvseg.cli import run_cli
from kvseg.commands.preprocess import main as preprocess_main
from kvseg.config import load_config
from kvseg.data.prepare import prepare_folder, prepare_training_data
from kvseg.errors import DatasetError


def _preprocess(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = run_cli(preprocess_main, list(args))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture()
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread that had each pair decoded, for the check or for the cache: one entry a pair."""
    seen: list[str] = []
    read_pairs, write_entry = kvseg.data.prepare.read_pairs, kvseg.data.preprocessed._write_entry

    def check(samples, *args):
        seen.extend([threading.current_thread().name] * len(samples))
        return read_pairs(samples, *args)

    def cache(folder, samples, *args):
        seen.extend([threading.current_thread().name] * len(samples))
        return write_entry(folder, samples, *args)

    monkeypatch.setattr(kvseg.data.prepare, "read_pairs", check)
    monkeypatch.setattr(kvseg.data.preprocessed, "_write_entry", cache)
    return seen


def test_preprocess_checks_caches_and_is_reused(dataset_copy: Path, decodes: list[str]) -> None:
    status, out, _ = _preprocess(str(dataset_copy), "--image-size", "32")
    assert status == 0, out
    assert f"Data {dataset_copy}: 32 image/mask pairs" in out and "Result: OK" in out
    assert "Check: decoded every pair" in out and "Cache: decoded 32 pairs at 32 px" in out
    assert len(decodes) == 2 * 32  # each pair once for the check and once for the cache
    status, again, _ = _preprocess(str(dataset_copy), "--image-size", "32")
    assert status == 0 and "Check: from its record (no file changed since)" in again and "pairs at 32 px already" in again
    assert len(decodes) == 2 * 32  # nothing decoded the second time
    assert again.split("\nCheck:")[0] == out.split("\nCheck:")[0]  # the same summary from the record

    # training's start (and a resume, whose config names the encoding decided) decode nothing either
    for overrides in ([], ["data.mask_encoding=binary-0-255"]):
        cfg = load_config(overrides=[f"data.root={dataset_copy}", "data.image_size=32", *overrides])
        prepare_training_data(cfg, local_main=True)
        assert cfg.data.mask_encoding == "binary-0-255"
    assert len(decodes) == 2 * 32

    mask = dataset_copy / "masks" / "synth0003.png"  # a file changes: the check reads the folder again
    cv2.imwrite(str(mask), cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE))
    status, changed, _ = _preprocess(str(dataset_copy), "--image-size", "32")
    assert status == 0 and "Check: decoded every pair" in changed and len(decodes) == 4 * 32


def test_the_other_processes_of_a_machine_wait_for_the_first_and_decode_nothing(dataset_copy: Path,
                                                                              decodes: list[str]) -> None:
    overrides = [f"data.root={dataset_copy}", "data.image_size=32"]
    waiting = load_config(overrides=overrides)
    errors: list[BaseException] = []

    def second_process() -> None:
        try:
            prepare_training_data(waiting, local_main=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    other = threading.Thread(target=second_process, name="local-rank-1")
    other.start()
    time.sleep(1.0)
    assert other.is_alive() and waiting.data.mask_encoding == "auto"  # it waits for the first process
    first = load_config(overrides=overrides)
    prepare_training_data(first, local_main=True)
    other.join(timeout=30)
    assert not other.is_alive() and errors == []
    assert waiting.data.mask_encoding == first.data.mask_encoding == "binary-0-255"
    assert decodes and "local-rank-1" not in decodes


def test_a_failed_check_stops_every_process_with_its_line(dataset_copy: Path) -> None:
    broken = dataset_copy / "images" / "synth0007.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    cfg = load_config(overrides=[f"data.root={dataset_copy}", "data.image_size=32"])
    prepared = prepare_folder(dataset_copy, cfg.data)
    assert not prepared.report.ok and prepared.frames is None
    with pytest.raises(DatasetError, match="synth0007.jpg") as first:
        prepare_training_data(load_config(overrides=[f"data.root={dataset_copy}", "data.image_size=32"]), local_main=True)
    with pytest.raises(DatasetError) as waiting:
        prepare_training_data(load_config(overrides=[f"data.root={dataset_copy}", "data.image_size=32"]), local_main=False)
    assert str(waiting.value) == str(first.value)
    status, out, err = _preprocess(str(dataset_copy))
    assert status == 2 and "Result: NOT OK" in out
    assert err.strip().splitlines()[-1].startswith("error: ") and "problem(s) found" in err


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    status, _, err = _preprocess(str(tmp_path / "nope"))
    assert status == 2 and err.count("\n") == 1 and "dataset folder not found" in err
    status, _, err = _preprocess(str(tmp_path), "--set", "data.cache_dir=" + str(tmp_path / "inside"))
    assert status == 2 and "data.cache_dir" in err and "inside the data folder" in err


def test_python_m_kvseg_preprocess_and_kvseg_preprocess(synthetic_root: Path) -> None:
    assert COMMANDS["preprocess"][0] == "kvseg.commands.preprocess"
    result = subprocess.run([sys.executable, "-m", "kvseg.preprocess", str(synthetic_root), "--image-size", "32"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Result: OK" in result.stdout and "Outcome: " in result.stdout
