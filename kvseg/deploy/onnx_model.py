"""An exported kvseg model: the ONNX graph, its metadata, and reading them back.

Every model takes ``image`` float32 (B, 3, H, W), normalised as in training, and returns ``logits``
float32 (B, 1, H, W). Its metadata properties (``kvseg.*``) hold the image size, input multiple,
normalisation, threshold, the model (``arch`` and its family's fields), opset, kvseg version,
training config and metrics, so a deployment needs
only the file: :func:`read_metadata` reads them back. Verification and quantisation are in
:mod:`kvseg.deploy.export` and :mod:`kvseg.deploy.quantize`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

import kvseg
from kvseg.config import Config
from kvseg.errors import KvsegError
from kvseg.models.build import describe, family_of, input_multiple
from kvseg.runs.checkpoint import threshold_of

DEFAULT_OPSET = 18


class ExportError(KvsegError):
    """A model cannot be exported as asked (e.g. an opset the exporter cannot write)."""


class HalfPrecision(nn.Module):
    """Runs a model in fp16 behind float32 input and output, for a fp16 ONNX graph with fp32 I/O."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image.half()).float()


@contextlib.contextmanager
def quiet():
    """Silence torch.onnx's progress on stdout and its and onnxscript's warnings; kvseg reports the outcome.

    (A failed opset conversion, for one, is logged with a traceback; :func:`export_model` turns it into one line.)
    """
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _name_dynamic_axes(model: onnx.ModelProto, dynamic_hw: bool) -> None:
    """Give the graph's dynamic axes readable names: batch, height, width."""
    names = ["batch", None, "height", "width"] if dynamic_hw else ["batch", None, None, None]
    for value in [*model.graph.input, *model.graph.output]:
        for dim, name in zip(value.type.tensor_type.shape.dim, names):
            if name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name


def export_model(
    model: nn.Module, path: Path, image_size: int, multiple: int, opset: int = DEFAULT_OPSET, dynamic_hw: bool = True
) -> None:
    """Export ``model`` to ``path`` with the dynamo exporter; batch always dynamic, H/W optionally.

    Dynamic height and width are multiples of ``multiple`` (the model's ``input_multiple``), the only
    sizes the model accepts. The sample has batch 2: torch.export takes a dimension of size 0 or 1 in
    the sample for a constant, and some torch releases (2.7 among them) then write a graph fixed at
    batch 1, which verification refuses.
    """
    sample = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    axes: dict[int, object] = {0: batch}
    if dynamic_hw:
        axes[2] = multiple * torch.export.Dim("height_blocks", min=1, max=8192 // multiple)
        axes[3] = multiple * torch.export.Dim("width_blocks", min=1, max=8192 // multiple)
    with quiet():
        program = torch.onnx.export(
            model, (sample,), dynamo=True, input_names=["image"], output_names=["logits"],
            dynamic_shapes=({**axes},), opset_version=opset, verbose=False,
        )
    onnx_model = program.model_proto
    written = opset_of(onnx_model)
    if written != opset:
        hint = "it converts down only where its converter can" if opset < written else "it writes no newer opset"
        raise ExportError(f"{path.name.removesuffix('.tmp')}: opset {opset} cannot be honoured: torch's exporter wrote "
                          f"opset {written} ({hint}); pass --opset {written}")
    _name_dynamic_axes(onnx_model, dynamic_hw)
    onnx.save(onnx_model, path)


def opset_of(model: onnx.ModelProto) -> int:
    """The version of the default ("ai.onnx") operator set the model imports."""
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def metadata_for(cfg: Config, payload: dict, precision: str, opset: int) -> dict[str, str]:
    """The ``kvseg.*`` metadata properties written into every exported model.

    ``mean`` / ``std`` are the run's normalisation (an smp encoder's own where its weights set it);
    the model is named by ``arch`` and ``model`` (in words), with the fields its family reads.
    """
    family = family_of(cfg.model.arch)
    shape = ({"base_channels": cfg.model.base_channels, "depth": cfg.model.depth, "upsample": cfg.model.upsample}
             if family == "unet" else
             {"encoder": cfg.model.encoder, "encoder_weights": cfg.model.encoder_weights} if family == "smp" else {})
    values = {
        "opset": opset,
        "image_size": cfg.data.image_size,
        "input_multiple": input_multiple(cfg.model),
        "mean": cfg.augment.mean,
        "std": cfg.augment.std,
        "max_pixel_value": 255.0,
        "threshold": threshold_of(payload),
        "arch": cfg.model.arch,
        "model": describe(cfg.model),
        **shape,
        "precision": precision,
        "version": kvseg.__version__,
        "epoch": payload.get("epoch"),
        "config": payload["config"],
        "metrics": payload.get("metrics"),
    }
    return {f"kvseg.{key}": json.dumps(value) for key, value in values.items()}


def write_metadata(path: Path, properties: dict[str, str]) -> None:
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in properties.items():
        model.metadata_props.add(key=key, value=value)
    name = json.loads(properties["kvseg.model"]) if "kvseg.model" in properties else "model"
    model.doc_string = f"kvseg {name}: image (B,3,H,W) float32 normalised -> logits (B,1,H,W); see kvseg.* metadata"
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict:
    """The ``kvseg.*`` metadata of an exported model, decoded (``image_size``, ``mean``, ``config``, ...)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key.removeprefix("kvseg."): json.loads(p.value) for p in model.metadata_props if p.key.startswith("kvseg.")}


def check_model(path: Path) -> None:
    """``onnx.checker`` (full check, with shape inference) on the file at ``path``."""
    onnx.checker.check_model(str(path), full_check=True)
