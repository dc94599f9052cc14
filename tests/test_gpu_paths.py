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


@pytest.fixture()
def gpu_flags():
    """cuDNN and TF32 flags as they were before the test (they are process-wide)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    new_api = hasattr(matmul, "fp32_precision")
    saved = (conv.benchmark, matmul.fp32_precision, conv.conv.fp32_precision) if new_api else \
        (conv.benchmark, matmul.allow_tf32, conv.allow_tf32)
    yield
    conv.benchmark = saved[0]
    if new_api:
        matmul.fp32_precision, conv.conv.fp32_precision = saved[1], saved[2]
    else:
        matmul.allow_tf32, conv.allow_tf32 = saved[1], saved[2]


def test_gpu_runs_autotune_and_use_tf32_and_record_it(gpu_flags, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvseg.runtime import configure_gpu_math, gpu_math
    from kvseg.training.factory import environment

    torch.backends.cudnn.benchmark = False
    assert configure_gpu_math(torch.device("cpu")) == gpu_math() and not gpu_math()["cudnn_benchmark"]
    assert configure_gpu_math(torch.device("cuda")) == {"cudnn_benchmark": True, "tf32_matmul": True, "tf32_conv": True}
    monkeypatch.setattr(kvseg.training.factory, "describe_machine", lambda: {"cpu": "test"})
    run = SimpleNamespace(device=torch.device("cuda"), num_processes=8, distributed_type="MULTI_GPU", mixed_precision="bf16")
    recorded = environment(run, load_config())
    assert recorded["cudnn_benchmark"] and recorded["tf32_matmul"] and recorded["tf32_conv"]
    assert recorded["augment_on"] == "device" and recorded["mixed_precision"] == "bf16"


@pytest.mark.parametrize(("launcher", "bf16", "expected"), [
    (None, True, "bf16"),  # torchrun or plain python: no launcher precision
    ("no", True, "bf16"),  # accelerate launch without --mixed_precision
    ("fp16", True, "fp16"),  # the launcher's choice stands
    (None, False, "no"),  # no native bf16 (before Ampere): fp32
])
def test_bf16_is_the_default_on_gpus_that_have_it(monkeypatch: pytest.MonkeyPatch, launcher, bf16: bool,
                                                 expected: str) -> None:
    from kvseg.runtime import resolve_mixed_precision

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    assert resolve_mixed_precision("auto") == expected
    assert resolve_mixed_precision("no") == "no"


def test_workers_and_threads_follow_the_processes_of_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvseg.runtime
    from kvseg.runtime import cpu_threads_per_process, default_num_workers, resolve_augment_on

    monkeypatch.setattr(kvseg.runtime, "usable_cores", lambda: 64)
    monkeypatch.setenv("WORLD_SIZE", "16")  # two machines of 8 GPUs, 64 cores each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers() == 7 and cpu_threads_per_process(0) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_num_workers() == 8  # at most 8
    assert resolve_augment_on("auto", torch.device("cuda")) == "device"
    assert resolve_augment_on("auto", torch.device("cpu")) == "workers"
    assert resolve_augment_on("device", torch.device("cpu")) == "device"


def test_only_the_train_loader_keeps_its_workers(synthetic_root) -> None:
    from kvseg.data.dataset import build_dataloaders, build_datasets
    from kvseg.data.folder import find_samples

    cfg = load_config(overrides=["data.image_size=32", "data.num_workers=2"])
    samples = find_samples(synthetic_root)
    ids = sorted(samples)
    loaders = build_dataloaders(cfg, build_datasets(cfg, samples, {"train": ids[:8], "val": ids[8:12], "test": ids[12:16]}))
    assert loaders["train"].persistent_workers and loaders["train"].num_workers == 2
    assert not loaders["val"].persistent_workers and not loaders["test"].persistent_workers
