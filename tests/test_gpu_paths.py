"""GPU-only logic reached on the CPU (availability monkeypatched), and GPU tests that run where a GPU is."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import kvseg.training.factory
from kvseg.config import load_config
from kvseg.errors import ConfigError
from kvseg.training.factory import build_accelerator, prepare_model


def _sync_batchnorm_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def test_syncbatchnorm_only_with_several_gpu_processes() -> None:
    cfg = load_config(overrides=["model.base_channels=4", "model.depth=2"])
    several_gpus = SimpleNamespace(num_processes=2, device=torch.device("cuda"))
    assert _sync_batchnorm_layers(prepare_model(cfg, several_gpus)) == 10  # every BatchNorm of the U-Net
    assert _sync_batchnorm_layers(prepare_model(cfg, SimpleNamespace(num_processes=1, device=torch.device("cuda")))) == 0
    assert _sync_batchnorm_layers(prepare_model(cfg, SimpleNamespace(num_processes=2, device=torch.device("cpu")))) == 0
    cfg.train.sync_batchnorm = "off"
    assert _sync_batchnorm_layers(prepare_model(cfg, several_gpus)) == 0


def test_gpu_only_settings_on_the_cpu_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvseg.training.factory, "no_accelerator", lambda: True)
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):  # accelerate would silently train in fp32
        build_accelerator(load_config(), "fp16")
    with pytest.raises(ConfigError, match="sync_batchnorm"):
        build_accelerator(load_config(overrides=["train.sync_batchnorm=on"]), "no")


def test_a_gpu_run_copies_batches_without_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvseg.training.factory, "no_accelerator", lambda: False)
    accelerator = build_accelerator(load_config(), "no")
    assert accelerator.dataloader_config.non_blocking


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_a_gpu(precision: str, synthetic_root) -> None:
    """One short epoch on CUDA: finite loss, and a gradient scaler exactly for fp16."""
    from kvseg.data.dataset import build_dataloaders, build_datasets
    from kvseg.data.folder import find_samples
    from kvseg.data.splits import resolve_split
    from kvseg.models.losses import build_loss
    from kvseg.training.optim import build_optimizer
    from kvseg.training.train import train_one_epoch

    cfg = load_config(overrides=["data.image_size=64", "data.num_workers=0", "model.base_channels=8", "model.depth=3"])
    accelerator = build_accelerator(cfg, precision)
    samples = find_samples(synthetic_root)
    split = resolve_split(synthetic_root, samples, 0, 0.2)
    loader = build_dataloaders(cfg, build_datasets(cfg, samples, {"train": split.train}), pin_memory=True)["train"]
    model = prepare_model(cfg, accelerator)
    optimizer = build_optimizer(model, cfg.train)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    stats = train_one_epoch(model, loader, optimizer, build_loss(cfg.train), accelerator, True)
    assert torch.isfinite(torch.tensor(stats.loss))
    assert (accelerator.scaler is not None) == (precision == "fp16")
