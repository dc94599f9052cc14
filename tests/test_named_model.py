"""python -m kvseg.predict --model NAME: a recipe's name finds the newest run of its model, exported or not; images
and video alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from kvseg.bench.video import write_clip
from kvseg.cli import run_cli
from kvseg.commands.predict import main as predict_main
from kvseg.config import load_config
from kvseg.deploy.export import export_run
from kvseg.deploy.named import recipe_path
from kvseg.errors import ConfigError
from kvseg.models.build import family_of


@pytest.fixture()
def runs(fresh_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(fresh_run, tmp_path / "runs" / "tiny")
    return tmp_path / "runs"


def _recipe(path: Path, model: dict, image_size: int = 64) -> Path:
    path.write_text(yaml.safe_dump({"data": {"image_size": image_size}, "model": model}))
    return path


def test_a_recipe_name_runs_its_newest_model(runs: Path, tmp_path: Path, synthetic_root: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    recipe = _recipe(tmp_path / "tiny.yaml", {"base_channels": 8, "depth": 3})
    image = next((synthetic_root / "images").iterdir())
    common = ["--model", str(recipe), "--runs-dir", str(runs), str(image)]
    assert run_cli(predict_main, [*common, "--out", str(tmp_path / "by_torch")]) == 0
    assert f"{runs / 'tiny' / 'checkpoints' / 'best.pt'} (PyTorch" in capsys.readouterr().out  # nothing exported yet
    export_run(runs / "tiny" / "checkpoints" / "best.pt", runs / "tiny" / "model.onnx", run_dir=runs / "tiny")
    clip = write_clip([np.full((64, 80, 3), 90, np.uint8)], tmp_path / "clip.mp4", count=6, size=(128, 72))
    assert run_cli(predict_main, [*common, str(clip), "--out", str(tmp_path / "by_onnx"), "--runtime", "openvino"]) == 0
    assert f"{runs / 'tiny' / 'model.onnx'} (openvino)" in capsys.readouterr().out
    by_torch = (tmp_path / "by_torch" / f"{image.stem}_mask.png").read_bytes()
    assert (tmp_path / "by_onnx" / f"{image.stem}_mask.png").is_file() and by_torch
    video = json.loads((tmp_path / "by_onnx" / "clip.json").read_text())
    assert video["frames"] == 6 and video["model"].startswith(str(runs / "tiny" / "model.onnx"))


def test_a_recipe_without_a_run_says_how_to_train_it(runs: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "other.yaml", {"arch": "light-m"})
    with pytest.raises(Exception, match=r"no trained run of light-m at 64 px .* accelerate launch train_ddp.py --config"):
        run_cli(predict_main, ["--model", str(recipe), "--runs-dir", str(runs), "x.png", "--out", str(tmp_path), "--debug"])


def test_the_recommended_real_time_model_has_a_name() -> None:
    path = recipe_path("realtime_cpu")
    assert path.name == "realtime_cpu.yaml"
    cfg = load_config(path)
    assert family_of(cfg.model.arch) == "light" and cfg.data.image_size == 256
    with pytest.raises(ConfigError, match=r"--model nope: no recipe nope.yaml .* realtime_cpu"):
        recipe_path("nope")
