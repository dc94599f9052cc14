"""Shared fixtures: tiny synthetic datasets written once per test session."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import socket
from pathlib import Path
from types import ModuleType, SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from torch.utils.data import DataLoader

from kvseg.cli import configure_logging, run_cli
from kvseg.config import config_to_yaml, load_config
from kvseg.data.dataset import build_dataloaders, build_datasets
from kvseg.data.folder import find_samples
from kvseg.data.splits import resolve_split, write_split
from kvseg.data.synthetic import write_synthetic_dataset
from kvseg.evaluation.evaluate import EvalResult, evaluate
from kvseg.models.unet import build_model
from kvseg.runs.checkpoint import save_model_checkpoint
from kvseg.runs.folder import RunDir

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped on machines without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def entry_point(name: str) -> ModuleType:
    """The top-level script ``REPO/<name>.py`` imported as a module (not as ``__main__``: no re-exec)."""
    spec = importlib.util.spec_from_file_location(f"kvseg_entry_{name}", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_error(name: str, *args: str) -> str:
    """Run entry point ``name`` with ``args`` in this process, as its ``__main__`` block does; assert exit
    status 2 with one ``error: ...`` line on stderr (warnings aside) and return that line. The tests that
    start the scripts as processes check the same contract once per script; this saves a start-up each."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = run_cli(entry_point(name).main, list(args))
        except SystemExit as exc:  # argparse
            status = exc.code
    lines = [line for line in err.getvalue().strip().splitlines() if not line.startswith("warning: ")]
    assert status == 2, err.getvalue()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err.getvalue(), err.getvalue()
    return lines[0]


def kvseg_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages kvseg's loggers sent while ``caplog`` was capturing, in order."""
    return [record.getMessage() for record in caplog.records if record.name.startswith("kvseg")]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> None:
    """Each test starts without accelerate's process-wide state: accelerate refuses an ``Accelerator(cpu=False)``
    after an earlier ``Accelerator(cpu=True)`` in the same process, as a test that fakes a GPU builds one."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    """Library messages print as the commands print them (kvseg.cli.configure_logging)."""
    configure_logging()


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The on-disk frame cache of every test (and process it starts) lives in the session's temporary folder."""
    os.environ["KVSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("kvseg-cache"))


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
    """Generic layout: mixed extensions and sizes, grey / RGB / GIF / JPEG / red 0-255 masks, no split files."""
    root = tmp_path / "generic"
    rng = np.random.default_rng(0)
    shapes = {"a": (60, 80), "b": (100, 70), "c": (64, 64), "d": (90, 120), "e": (50, 50)}
    for name, (h, w) in shapes.items():
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        ext = {"a": ".jpg", "b": ".png", "c": ".tif", "d": ".bmp", "e": ".jpeg"}[name]
        write_image(root / "images" / f"{name}{ext}", image)
    write_image(root / "masks" / "a.png", disk_mask(60, 80) * 255)
    write_image(root / "masks" / "b.png", np.dstack([disk_mask(100, 70) * 255] * 3))  # RGB mask
    Image.fromarray(disk_mask(64, 64) * 255).save(root / "masks" / "c.gif")  # a palette of greys, as GIF writers make
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
def fresh_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder made in-process: a base-8 U-Net (depth 3, 64 px) trained 16 epochs on
    :func:`synthetic_root` by a plain loop, saved as its best checkpoint with a history.json. Do not modify."""
    cfg = load_config(overrides=[f"data.root={synthetic_root}", "data.image_size=64", "data.num_workers=0",
                                 "model.base_channels=8", "model.depth=3", "train.batch_size=4"])
    run = RunDir(tmp_path_factory.mktemp("fresh") / "run")
    run.checkpoints.mkdir(parents=True)
    samples = find_samples(synthetic_root)
    split = resolve_split(synthetic_root, samples, cfg.data.split_seed, cfg.data.test_fraction)
    write_split(split, run.path)
    run.config.write_text(config_to_yaml(cfg))
    datasets = build_datasets(cfg, samples, {"train": split.train})
    loader = build_dataloaders(cfg, datasets)["train"]
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    history = []
    for epoch in range(1, 17):
        datasets["train"].set_epoch(epoch)
        losses = []
        for images, masks, _ in loader:
            loss = loss_fn(model(images), masks.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "seconds": 1.0, "images_per_s": 1.0})
    run.write_history(history)
    save_model_checkpoint(run.best, model.eval(), cfg, epoch=16, metrics=None)
    return run.path


class TensorSplit(torch.utils.data.Dataset):
    """Ready-made (logits, masks) pairs; :func:`score` evaluates them with an identity logits function."""

    def __init__(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        self.logits, self.masks = logits, masks
        self.samples = [SimpleNamespace(id=f"img{i}") for i in range(len(logits))]

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.logits[index], self.masks[index], index


def score(logits: torch.Tensor, masks: torch.Tensor, batch_size: int | None = None, threshold: float = 0.5,
          loss: bool = True) -> EvalResult:
    """``evaluate`` of the given logits (B, 1, H, W) against masks, with BCE as the loss."""
    loader = DataLoader(TensorSplit(logits, masks), batch_size=batch_size or len(logits))
    return evaluate(lambda x: x, loader, threshold, torch.nn.BCEWithLogitsLoss() if loss else None, "bce" if loss else None)
