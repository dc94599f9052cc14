"""The offline wheel list for a GPU machine (benchmarks/gpu_wheels.txt) covers what its packages declare.

What each pinned wheel declares is read from benchmarks/gpu_wheels.lock.json (``gpu_wheels.py
--write-lock`` writes it from the index's metadata), never from the packages installed where the
tests run: a package that an old install left behind cannot hide a missing one, and a newer release
installed here cannot fail the list. benchmarks/gpu_wheels.py checks the downloaded wheels' own
METADATA the same way after each download.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_wheels.py"
_spec = importlib.util.spec_from_file_location("gpu_wheels", SCRIPT)
gpu_wheels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_wheels)

PINS = gpu_wheels.read_pins()
LOCK = gpu_wheels.read_lock()
TARGET = gpu_wheels.target_environment("3.11", gpu_wheels.DEFAULT_PLATFORMS)


@pytest.fixture(scope="module")
def kvseg_requirements() -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def declared() -> dict[str, list[str]]:
    """``{"name version": requirements}`` of every pinned wheel, from the lock."""
    return {f"{name} {entry['version']}": entry["requires_dist"] for name, entry in LOCK.items()}


def test_the_lock_holds_exactly_the_pinned_versions() -> None:
    assert {name: entry["version"] for name, entry in LOCK.items()} == PINS, "run benchmarks/gpu_wheels.py --write-lock"


def test_the_list_covers_what_its_packages_declare() -> None:
    assert gpu_wheels.uncovered(declared(), PINS, TARGET) == []


def test_the_list_covers_kvseg_with_markers_for_the_target(kvseg_requirements: list[str]) -> None:
    assert gpu_wheels.uncovered({"kvseg": kvseg_requirements}, PINS, TARGET) == []
    # On an ARM machine pyproject.toml asks for onnxruntime instead of onnxruntime-gpu.
    arm = gpu_wheels.target_environment("3.11", ["manylinux_2_28_aarch64"])
    assert [line.split(";")[0] for line in gpu_wheels.uncovered({"kvseg": kvseg_requirements}, PINS, arm)] == [
        "kvseg requires onnxruntime>=1.18"]


def test_every_listed_package_is_needed(kvseg_requirements: list[str]) -> None:
    reached, todo = set(), list(kvseg_requirements)
    while todo:
        for req in gpu_wheels.needed([todo.pop()], TARGET):
            name = gpu_wheels.canonicalize_name(req.name)
            if name not in reached:
                reached.add(name)
                if name in PINS:  # not into torch: what it needs comes with it
                    todo.extend(LOCK[name]["requires_dist"])
    assert set(PINS) - {"setuptools"} <= reached  # setuptools builds kvseg itself
    assert "antlr4-python3-runtime" not in reached  # omegaconf 2.4 vendors it


def test_a_requirement_left_out_is_named() -> None:
    pins = {name: version for name, version in PINS.items() if name != "albucore"}
    assert gpu_wheels.uncovered(declared(), pins, TARGET) == ["albumentations 2.0.8 requires albucore==0.0.24"]


def write_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_check_reads_the_metadata_of_downloaded_wheels(tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    pins = tmp_path / "pins.txt"
    pins.write_text("alpha==1.0\nbeta==2.0  # needed by alpha\n")
    write_wheel(folder, "alpha", "1.0", ["beta>=2", "numpy>=2.0", 'gamma; python_version < "3.8"', "delta; extra == 'x'"])
    beta = write_wheel(folder, "beta", "2.0", [])
    result = run_script(str(folder), "--check-only", "--requirements", str(pins))
    assert result.returncode == 0, result.stderr
    assert "2 wheels" in result.stdout and "must already have: numpy>=2.0 (alpha 1.0)" in result.stdout
    assert f"pip install --no-index --find-links {folder} -e ." in result.stdout

    pins.write_text("alpha==1.0\n")  # beta left out of the list
    assert _error(run_script(str(folder), "--check-only", "--requirements", str(pins))).endswith(
        "beta is not in the list; alpha 1.0 requires beta>=2")

    pins.write_text("alpha==1.0\nbeta==2.0\n")
    beta.unlink()
    assert _error(run_script(str(folder), "--check-only", "--requirements", str(pins))).endswith(": no wheel of beta==2.0")


def _error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "expected"), [
    (["--python-version", "3"], "--python-version: expected 3.N"),
    (["--platform", "win_amd64"], "expected manylinux tags"),
    (["--check-only"], "folder not found"),
])
def test_bad_input(tmp_path: Path, args: list[str], expected: str) -> None:
    assert expected in _error(run_script(str(tmp_path / "none"), *args))
    assert not (tmp_path / "none").exists()
