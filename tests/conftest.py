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
