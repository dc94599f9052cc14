"""Self-describing model checkpoints.

A model checkpoint holds the weights, the resolved config and the metrics of its epoch; it is written
atomically (:func:`kvseg.files.write_bytes`) and read with ``weights_only=True``. Where checkpoints
live is decided by :mod:`kvseg.runs.folder`.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

import kvseg
from kvseg.config import Config, config_from_dict, config_to_dict
from kvseg.errors import CheckpointError
from kvseg.files import json_safe, write_bytes
from kvseg.models.build import build_model, describe

CHECKPOINT_FORMAT = "kvseg-checkpoint-1"


def save_model_checkpoint(path: Path, model: torch.nn.Module, cfg: Config, epoch: int, metrics: dict | None,
                          threshold: float | None = None) -> None:
    """A self-describing model checkpoint (weights, config, metrics, probability threshold), written atomically.

    ``threshold`` defaults to ``cfg.train.threshold``; a threshold tuned on validation replaces it
    (:func:`set_threshold`).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _save({
        "format": CHECKPOINT_FORMAT,
        "kvseg_version": kvseg.__version__,
        "epoch": epoch,
        "config": config_to_dict(cfg),
        "metrics": json_safe(metrics),
        "threshold": cfg.train.threshold if threshold is None else threshold,
        "model": state,
    }, path)


def _save(payload: dict, path: Path) -> None:
    """Serialise in memory, then write the bytes atomically: ``torch.save`` to a file reports a full disk as
    a ``RuntimeError`` ("unexpected pos"), a plain write as the ``OSError`` that :func:`kvseg.files.replacing` names."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes(path, buffer.getbuffer())


def set_threshold(path: Path, threshold: float, tuning: dict) -> None:
    """Store a tuned probability threshold (and how it was chosen) in the checkpoint at ``path``."""
    payload = load_model_checkpoint(path)
    _save({**payload, "threshold": threshold, "threshold_tuning": json_safe(tuning)}, path)


def threshold_of(payload: dict) -> float:
    """The probability threshold a checkpoint's model is used with (tuned, or the configured one)."""
    return float(payload.get("threshold", payload["config"]["train"]["threshold"]))


def load_model_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_model_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        # torch's own message suggests weights_only=False: never for a file of unknown origin, so it is not shown
        raise CheckpointError(f"{path}: cannot read checkpoint (not a PyTorch file of tensors and plain values: "
                              f"{type(exc).__name__}); expected a kvseg .pt file") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a kvseg checkpoint (expected format {CHECKPOINT_FORMAT})")
    return payload


def load_trained_model(checkpoint: str | Path) -> tuple[torch.nn.Module, Config, dict]:
    """The fp32 model of a kvseg checkpoint in eval mode (built by :func:`kvseg.models.build.build_model` from
    its config's ``model``), its config, and the checkpoint's payload.

    Raises:
        CheckpointError: the file is missing or not a kvseg checkpoint, or its weights do not fit the model.
        ConfigError: the checkpoint's model cannot be built here (an ``smp.*`` model without smp installed).
    """
    payload = load_model_checkpoint(checkpoint)
    cfg = config_from_dict(payload["config"])
    model = build_model(cfg.model)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit the {describe(cfg.model)} its config describes "
            f"({str(exc).splitlines()[0]})"
        ) from None
    return model.eval(), cfg, payload
