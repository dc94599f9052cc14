"""A trained model by name: ``python -m kvseg.predict --model realtime_cpu``.

A name is the stem of a recipe in ``configs/`` (``configs/realtime_cpu.yaml`` names kvseg's
recommended real-time CPU model), or a path to any YAML config. The model it names is the newest
run under the runs folder with a selected checkpoint (``checkpoints/best.pt``) that was trained with
that recipe's model (the same ``model`` section and ``data.image_size``): its int8 ONNX model where
it was exported, else its fp32 ONNX model, else its best checkpoint in PyTorch. Train and export it once::

    accelerate launch train_ddp.py --config configs/realtime_cpu.yaml --data-dir YOUR_FOLDER
    python export.py --run runs/NAME --int8
"""

from __future__ import annotations

from pathlib import Path

from kvseg.config import Config, load_config
from kvseg.deploy.predict import Predictor, onnx_predictor, torch_predictor
from kvseg.errors import CheckpointError, ConfigError
from kvseg.models.build import describe
from kvseg.runs.folder import RunDir

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs/ (an editable install)


def recipe_path(name: str) -> Path:
    """The YAML file ``name`` stands for: a path, ``configs/NAME.yaml`` here, or the repository's ``configs/NAME.yaml``.

    Raises:
        ConfigError: no such file.
    """
    candidates = [Path(name), Path("configs") / f"{name}.yaml", CONFIGS / f"{name}.yaml"]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        known = sorted(p.stem for p in CONFIGS.glob("*.yaml")) if CONFIGS.is_dir() else []
        raise ConfigError(f"--model {name}: no recipe {name}.yaml in configs/ and no such file; expected one of "
                          f"{', '.join(known) or 'the configs/ of the repository'} or a YAML path")
    return found


def runs_of(recipe: Config, runs_dir: str | Path) -> list[RunDir]:
    """The runs under ``runs_dir`` with a best checkpoint, trained with ``recipe``'s model and image size, newest last."""
    found = []
    for path in sorted(Path(runs_dir).glob("*/checkpoints/best.pt")):
        run = RunDir(path.parent.parent)
        try:
            cfg = load_config(run.config)
        except ConfigError:
            continue  # a folder of another kvseg version or a broken config is not this recipe's run
        if cfg.model == recipe.model and cfg.data.image_size == recipe.data.image_size:
            found.append(run)
    return sorted(found, key=lambda run: run.best.stat().st_mtime)


def named_predictor(name: str, runs_dir: str | Path = "runs", runtime: str = "onnxruntime") -> tuple[Predictor, str]:
    """The predictor of the model ``name`` names (see the module doc), and what it runs, in words.

    Raises:
        ConfigError: no such recipe.
        CheckpointError: no run of the recipe's model under ``runs_dir``.
    """
    path = recipe_path(name)
    recipe = load_config(path)
    runs = runs_of(recipe, runs_dir)
    if not runs:
        raise CheckpointError(
            f"--model {name}: no trained run of {describe(recipe.model)} at {recipe.data.image_size} px "
            f"(the model of {path}) under {runs_dir}; train it: accelerate launch train_ddp.py --config {path} "
            "--data-dir YOUR_FOLDER, then python export.py --run RUN --int8 (or pass --runs-dir)")
    run = runs[-1]
    for precision in ("int8", "fp32"):
        if run.onnx(precision).is_file():
            return onnx_predictor(run.onnx(precision), runtime), f"{run.onnx(precision)} ({runtime})"
    if runtime != "onnxruntime":
        raise CheckpointError(f"--model {name}: {run} has no exported model for --runtime {runtime}; "
                              f"run python export.py --run {run} --int8")
    return torch_predictor(run.path), f"{run.best} (PyTorch; export it for speed: python export.py --run {run} --int8)"
