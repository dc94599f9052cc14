from pathlib import Path

import pytest

from conftest import REPO
from kvseg.config import Config, config_from_dict, config_to_dict, load_config
from kvseg.errors import ConfigError


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\nmodel:\n  base_channels: 8\n")
    cfg = load_config(path, ["train.epochs=3", "data.image_size=64"])
    assert (cfg.train.lr, cfg.model.base_channels, cfg.train.epochs, cfg.data.image_size) == (0.01, 8, 3, 64)
    assert cfg.model.depth == Config().model.depth


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "expected"),
    [
        ("train:\n  learning_rate: 0.1\n", [], "train.learning_rate"),
        ("", ["train.lr=fast"], "train.lr"),
        ("", ["train.epochs=2.5"], "train.epochs"),
        ("", ["model.upsample=nearest"], "model.upsample"),
        ("", ["train.batch_size=0"], "train.batch_size"),
        ("nonsense: [", [], "not valid YAML"),
        ("- a\n- b\n", [], "expected a YAML mapping"),
        ("", ["train.lr"], "expected key=value"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, yaml_text: str, overrides: list[str], expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_round_trip_through_dict() -> None:
    cfg = load_config(overrides=["train.lr=0.5", "augment.rotate_limit=10"])
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    assert isinstance(load_config(path), Config)
