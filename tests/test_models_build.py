"""The model registry: every arch builds and says its input multiple; bad names and missing weights are one-line
config errors; smp encoder weights come from a file or the local cache (written here), never from the network."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import kvseg.models.library
from conftest import cli_error
from kvseg.config import load_config
from kvseg.errors import ConfigError
from kvseg.models.build import build_model, check_model_config, count_parameters, describe, input_multiple
from kvseg.models.library import smp_available
from kvseg.models.light import SIZES, LightSeg

NEEDS_SMP = pytest.mark.skipif(not smp_available(), reason="segmentation_models_pytorch is not installed "
                               "(the optional extra: pip install -e '.[smp]')")


@pytest.mark.parametrize("arch", list(SIZES))
@pytest.mark.parametrize("shape", [(2, 3, 32, 48), (1, 3, 64, 64)])
def test_light_model_gives_one_logit_channel_at_input_size(arch: str, shape: tuple[int, ...]) -> None:
    model = build_model(load_config(overrides=[f"model.arch={arch}"]).model).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], 1, *shape[2:]) and out.dtype == torch.float32
    assert model.input_multiple == 16


def test_light_sizes_stay_small_and_grow_in_order() -> None:
    counts = [count_parameters(LightSeg(size)) for size in SIZES.values()]
    assert counts == sorted(counts) and counts[0] > 10_000 and counts[-1] < 400_000  # "a few hundred thousand or fewer"


def test_light_model_trains_compiles_and_refuses_a_bad_size() -> None:
    torch.manual_seed(0)
    model = LightSeg(SIZES["light-s"])
    x, target = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        reference = model(x)
        fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)(torch.randn(1, 3, 48, 32))
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    assert compiled.shape == (1, 1, 48, 32)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(1, 3, 40, 32))


@pytest.mark.parametrize(("overrides", "key", "words"), [
    (["model.arch=resnet"], "model.arch", "expected unet, light-s, light-m, light-l or smp.<Arch>"),
    (["model.arch=light-s", "data.image_size=40"], "data.image_size", "needs a multiple of 16"),
    (["model.arch=light-m", "data.image_size=16"], "data.image_size", "expected at least 32"),
    (["data.image_size=100"], "data.image_size", "needs a multiple of 16"),
])
def test_what_only_the_model_knows_is_a_config_error(overrides: list[str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_model_config(load_config(overrides=overrides))
    assert f"'{key}'" in str(info.value) and words in str(info.value) and "\n" not in str(info.value)


def test_a_bad_arch_stops_training_before_a_run_folder(synthetic_root: Path, tmp_path: Path) -> None:
    message = cli_error("train_ddp", "--data-dir", str(synthetic_root), "--output-dir", str(tmp_path), "--run-name", "x",
                        "--set", "model.arch=smp.NoSuchNet" if smp_available() else "model.arch=lite")
    assert "config key 'model.arch'" in message
    assert not (tmp_path / "x").exists()


def test_smp_without_the_library_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvseg.models.library, "smp_available", lambda: False)
    with pytest.raises(ConfigError, match=r"model.arch' is smp.Unet, which needs segmentation_models_pytorch \(pip "):
        check_model_config(load_config(overrides=["model.arch=smp.Unet"]))


@NEEDS_SMP
@pytest.mark.parametrize(("overrides", "key"), [
    (["model.arch=smp.Unetto"], "model.arch"),
    (["model.arch=smp.Unet", "model.encoder=resnet19"], "model.encoder"),
    (["model.arch=smp.Unet", "model.encoder=tu-no_such_net"], "model.encoder"),
    (["model.arch=smp.FPN", "model.encoder_weights=/nowhere/weights.pth"], "model.encoder_weights"),
    (["model.arch=smp.Unet", "data.image_size=48"], "data.image_size"),
])
def test_bad_smp_settings_name_their_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_model_config(load_config(overrides=overrides))
    assert f"'{key}'" in str(info.value) and "\n" not in str(info.value)


@NEEDS_SMP
def test_smp_model_builds_with_random_weights_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(overrides=["model.arch=smp.UnetPlusPlus", "model.encoder=resnet18"])
    with caplog.at_level(logging.INFO, logger="kvseg"):
        model = build_model(cfg.model, pretrained=True).eval()
    assert any("encoder starts from random weights" in r.getMessage() for r in caplog.records)
    assert model.input_multiple == input_multiple(cfg.model) == 32
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 96)).shape == (2, 1, 64, 96)
    assert describe(cfg.model) == "smp.UnetPlusPlus (resnet18, random weights)"


def _encoder_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(load_config(overrides=["model.arch=smp.Unet"]).model)
    return {k: v.clone() for k, v in model.network.encoder.state_dict().items()}


@NEEDS_SMP
def test_encoder_weights_from_a_file(tmp_path: Path) -> None:
    state = _encoder_state(seed=7)
    path = tmp_path / "resnet18_encoder.pt"
    torch.save(state, path)
    cfg = load_config(overrides=["model.arch=smp.Unet", f"model.encoder_weights={path}"])
    check_model_config(cfg)
    loaded = build_model(cfg.model, pretrained=True).network.encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not torch.equal(build_model(cfg.model).network.encoder.state_dict()["conv1.weight"], state["conv1.weight"])
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match=r"model.encoder_weights': .* does not fit the resnet18 encoder"):
        build_model(cfg.model, pretrained=True)


@NEEDS_SMP
def test_imagenet_weights_come_from_the_local_cache_with_their_normalisation(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants
    from safetensors.torch import save_file
    from segmentation_models_pytorch.encoders import encoders

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config(overrides=["model.arch=smp.Unet", "model.encoder_weights=imagenet"])
    with pytest.raises(ConfigError, match=r"smp-hub/resnet18.imagenet/model.safetensors is not in the local Hugging"):
        check_model_config(cfg)
    settings = encoders["resnet18"]["pretrained_settings"]["imagenet"]
    snapshot = tmp_path / "hub" / f"models--{settings['repo_id'].replace('/', '--')}" / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    state = _encoder_state(seed=3)
    save_file(state, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    check_model_config(cfg)
    assert (cfg.augment.mean, cfg.augment.std) == ([0.5] * 3, [0.25] * 3)  # the weights' normalisation, kept in the config
    loaded = build_model(cfg.model, pretrained=True).network.encoder.state_dict()
    assert torch.equal(loaded["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


@NEEDS_SMP
def test_timm_encoder_weights_from_a_file(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}
    save_file(state, str(tmp_path / "resnet18.safetensors"))
    cfg = load_config(overrides=["model.arch=smp.Unet", "model.encoder=tu-resnet18",
                                 f"model.encoder_weights={tmp_path / 'resnet18.safetensors'}"])
    check_model_config(cfg)
    loaded = build_model(cfg.model, pretrained=True).network.encoder.model.state_dict()
    assert torch.equal(loaded["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
