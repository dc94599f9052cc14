"""Shared fixtures: tiny synthetic datasets written once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvseg.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32-image stand-in (64 x 80 px) in the official Kvasir-Instrument layout. Do not modify."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "kvasir", num_images=32, size=64, seed=3)


@pytest.fixture()
def dataset_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`synthetic_root` that a test may break."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "copy"))


TINY_TRAINING = ["--image-size", "64", "--batch-size", "4", "--num-workers", "1",
                 "--set", "model.base_channels=8", "--set", "model.depth=3"]


@pytest.fixture(scope="session")
def tiny_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished single-process run (base-8 U-Net, 64 px, 6 epochs) on :func:`synthetic_root`. Do not modify."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("tiny_runs")
    result = subprocess.run(
        [sys.executable, str(REPO / "train_ddp.py"), "--data-dir", str(synthetic_root), "--epochs", "6",
         "--output-dir", str(out), "--run-name", "tiny", "--lr", "0.01", *TINY_TRAINING],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "tiny"
