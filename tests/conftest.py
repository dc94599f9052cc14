"""Shared fixtures: tiny synthetic datasets written once per test session."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kvseg.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped on machines without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32-image stand-in (64 x 80 px) in the official Kvasir-Instrument layout. Do not modify."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "kvasir", num_images=32, size=64, seed=3)


def write_image(path: Path, array: np.ndarray, flags: tuple[int, ...] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array[..., ::-1] if array.ndim == 3 else array
    assert cv2.imwrite(str(path), np.ascontiguousarray(data), list(flags))


def disk_mask(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (w // 2, h // 2), min(h, w) // 3, 1, -1)
    return mask


@pytest.fixture()
def generic_root(tmp_path: Path) -> Path:
    """Generic layout: mixed extensions and sizes, RGB / 0-1 / JPEG masks, no split files."""
    root = tmp_path / "generic"
    rng = np.random.default_rng(0)
    shapes = {"a": (60, 80), "b": (100, 70), "c": (64, 64), "d": (90, 120), "e": (50, 50)}
    for name, (h, w) in shapes.items():
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        ext = {"a": ".jpg", "b": ".png", "c": ".tif", "d": ".bmp", "e": ".jpeg"}[name]
        write_image(root / "images" / f"{name}{ext}", image)
    write_image(root / "masks" / "a.png", disk_mask(60, 80) * 255)
    write_image(root / "masks" / "b.png", np.dstack([disk_mask(100, 70) * 255] * 3))  # RGB mask
    write_image(root / "masks" / "c.png", disk_mask(64, 64))  # 0/1 mask
    write_image(root / "masks" / "d.jpg", disk_mask(90, 120) * 255, (cv2.IMWRITE_JPEG_QUALITY, 60))  # grey edges
    red = np.zeros((50, 50, 3), np.uint8)
    red[..., 0] = disk_mask(50, 50) * 255  # a pure-red mask, as some tools save them
    write_image(root / "masks" / "e.bmp", red)
    return root


@pytest.fixture()
def dataset_copy(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`synthetic_root` that a test may break."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "copy"))


TINY_TRAINING = ["--image-size", "64", "--batch-size", "4", "--num-workers", "1",
                 "--set", "model.base_channels=8", "--set", "model.depth=3"]


@pytest.fixture(scope="session")
def tiny_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished single-process run (base-8 U-Net, 64 px, 6 epochs) on :func:`synthetic_root`. Do not modify."""
    out = tmp_path_factory.mktemp("tiny_runs")
    result = subprocess.run(
        [sys.executable, str(REPO / "train_ddp.py"), "--data-dir", str(synthetic_root), "--epochs", "6",
         "--output-dir", str(out), "--run-name", "tiny", "--lr", "0.01", *TINY_TRAINING],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "tiny"
