"""kvseg.allocator: the environment each choice sets, the switch, and the re-executed entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvseg.allocator
from conftest import REPO
from kvseg.allocator import DONE, ENV, GLIBC_TUNING, allocator_environment, benchmark_times_openvino, preloaded_malloc
from kvseg.deploy.backends import Skipped, build_backend


def test_glibc_keeps_large_blocks_and_sets_no_preload() -> None:
    env, description = allocator_environment("glibc", {"PATH": "/bin"})
    assert {k: env[k] for k in GLIBC_TUNING} == GLIBC_TUNING and "LD_PRELOAD" not in env
    assert env[DONE] == description and "glibc" in description


def test_tcmalloc_is_preloaded_before_what_the_user_preloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    library = tmp_path / "libtcmalloc_minimal.so.4"
    monkeypatch.setattr(kvseg.allocator, "find_tcmalloc", lambda: library)
    env, _ = allocator_environment("auto", {"LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"] == f"{library}:/opt/other.so"
    assert not set(GLIBC_TUNING) & set(env)


def test_missing_tcmalloc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvseg.allocator, "find_tcmalloc", lambda: None)
    assert "MALLOC_MMAP_MAX_" in allocator_environment("auto", {})[0]  # auto falls back to tuned glibc
    with pytest.raises(ValueError, match="apt install libtcmalloc-minimal4"):
        allocator_environment("tcmalloc", {})
    with pytest.raises(ValueError, match="expected one of auto, tcmalloc, glibc, off"):
        allocator_environment("jemalloc", {})


def _allocator_seen(choice: str | None, without_tcmalloc: str = "") -> subprocess.CompletedProcess:
    code = ("import os; from kvseg.allocator import reexec_with_allocator; "
            f"reexec_with_allocator({without_tcmalloc!r}); "
            f"print(os.getpid(), os.environ.get('{DONE}'), os.environ.get('MALLOC_MMAP_MAX_'))")
    env = {k: v for k, v in os.environ.items() if k not in (ENV, DONE)}
    if choice is not None:
        env[ENV] = choice
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator is chosen on Linux only")
def test_the_process_replaces_itself_once_and_the_switch_turns_it_off() -> None:
    on = _allocator_seen("glibc").stdout.splitlines()[-1].split()
    assert on[1:] == ["glibc", "malloc", "without", "mmap", "for", "large", "blocks", "0"]
    off = _allocator_seen("off").stdout.splitlines()[-1].split()
    assert off[1:] == ["None", "None"]
    bad = _allocator_seen("jemalloc")
    assert bad.returncode == 2 and bad.stderr.strip().startswith(f"error: {ENV}='jemalloc'")
    assert _allocator_seen("").stdout.splitlines()[-1].split()[1] in ("glibc", "tcmalloc")  # empty: auto


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator is chosen on Linux only")
def test_auto_leaves_tcmalloc_out_where_openvino_will_load() -> None:
    result = _allocator_seen(None, without_tcmalloc="OpenVINO backends are timed")
    assert result.stdout.splitlines()[0] == ("note: OpenVINO backends are timed; using glibc malloc tuned for large "
                                             "tensors instead of tcmalloc")
    assert result.stdout.splitlines()[-1].split()[1:3] == ["glibc", "malloc"]


def test_openvino_refuses_to_start_under_a_preloaded_malloc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert preloaded_malloc({"LD_PRELOAD": "/opt/a.so /usr/lib/libjemalloc.so.2"}) == "/usr/lib/libjemalloc.so.2"
    assert preloaded_malloc({"LD_PRELOAD": "/opt/a.so"}) is None and preloaded_malloc({}) is None
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    with pytest.raises(Skipped, match="OpenVINO crashes with libtcmalloc_minimal.so.4 preloaded"):
        build_backend("ov-fp32", None, lambda precision: tmp_path / "model.onnx")


def test_benchmark_reads_whether_it_will_time_openvino() -> None:
    times_openvino = benchmark_times_openvino
    assert times_openvino([]) and times_openvino(["--backends", "ov-int8"]) and times_openvino(["--backends=ov-fp32"])
    assert not times_openvino(["--run", "r", "--backends", "torch-fp32,ort-int8"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator is chosen on Linux only")
def test_a_training_run_records_its_allocator(fresh_run: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--run", str(fresh_run), "--backends",
                             "torch-fp32", "--batch-sizes", "1", "--iters", "1", "--warmup", "0", "--train-steps", "0",
                             "--loader-seconds", "0", "--json", str(tmp_path / "b.json")],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, ENV: "glibc"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "b.json").read_text())["machine"]["allocator"].startswith("glibc")


@pytest.mark.parametrize("torch_first", [False, True], ids=["kvseg first", "torch first"])
def test_an_openmp_binding_does_not_make_one_core(torch_first: bool) -> None:
    """OMP_PROC_BIND pins torch's main thread to one core as torch starts; kvseg still counts every usable core."""
    order = "import torch, kvseg.runtime as r" if torch_first else "import kvseg.runtime as r, torch"
    script = f"{order}; torch.ones(64, 64) @ torch.ones(64, 64); print(r.usable_cores(), r.cpu_threads_per_process(0))"
    env = {**os.environ, "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    cores = len(os.sched_getaffinity(0))
    assert result.stdout.split() == [str(cores), str(cores)]
