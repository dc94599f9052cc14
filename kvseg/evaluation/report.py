"""The figures and the index.html of a run, from its folder and its best checkpoint.

:func:`write_report` writes into RUN_DIR: loss_curve.png, metrics.png, confusion_matrix.png, pr_roc.png (the study's
figures 1-3), feature_maps.png (Fig. 4), predictions.png (training images, then the worst test
images first), augmentations.png (Fig. 6) and index.html showing the metrics and every figure.
The training command calls it at the end of every run; ``python -m kvseg.report`` again at any time.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from kvseg.config import ModelConfig, config_to_dict
from kvseg.data.dataset import SegmentationDataset
from kvseg.evaluation.datasets import eval_datasets
from kvseg.evaluation.evaluate import evaluate, torch_logits
from kvseg.evaluation.metrics import SCORES
from kvseg.evaluation.plots import (
    plot_augmentations,
    plot_confusion_matrix,
    plot_feature_maps,
    plot_loss_curve,
    plot_metrics,
    plot_pr_roc,
    plot_predictions,
)
from kvseg.evaluation.tta import DIHEDRAL
from kvseg.files import WriteError, write_text
from kvseg.models.build import describe
from kvseg.models.losses import build_loss
from kvseg.runs.checkpoint import threshold_of
from kvseg.runs.folder import RunDir

FIGURES = {
    "loss_curve.png": "Loss per epoch (train, and validation where evaluated)",
    "metrics.png": "Test metrics, per-image mean and dataset-level",
    "confusion_matrix.png": "Pixel confusion matrix of the test split",
    "pr_roc.png": "Precision-recall and ROC curves of the test pixels",
    "predictions.png": "Training images, then the worst test images first",
    "augmentations.png": "Predictions on rotated, flipped and transposed test images, mapped back",
    "feature_maps.png": "Feature maps of one test image, strongest channels per layer",
}
AUGMENTATION_VERSIONS = ("identity", "rot90", "hflip", "vflip", "transpose")
logger = logging.getLogger(__name__)


def _iou(truth: np.ndarray, predicted: np.ndarray) -> float:
    union = np.logical_or(truth, predicted).sum()
    return float(np.logical_and(truth, predicted).sum() / union) if union else 1.0


def _model_input(dataset: SegmentationDataset, image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """The eval pipeline's tensor (1, 3, S, S) for an image already decoded by ``dataset.load``."""
    return dataset.transform(image=image, mask=mask)["image"][None]


def _predicted(model: nn.Module, dataset: SegmentationDataset, index: int, threshold: float) -> dict:
    image, mask = dataset.load(index)
    tensor = _model_input(dataset, image, mask)
    predicted = (torch.sigmoid(torch_logits(model)(tensor))[0, 0] > threshold).numpy()
    return {"image": image, "truth": mask.astype(bool), "predicted": predicted, "iou": _iou(mask.astype(bool), predicted)}


def feature_maps(model: nn.Module, image: torch.Tensor) -> dict[str, np.ndarray]:
    """Activations (C, h, w) float32 of each layer the model names in ``stages()`` (in that order) for one image
    (3, H, W).

    A stage that returns a list of feature maps (an smp encoder: one per stride) gives one entry per map
    that has more than one pixel, the input image itself left out.
    """
    maps: dict[str, np.ndarray] = {}

    def record(name: str, inputs: tuple, out: torch.Tensor | list | tuple) -> None:
        if isinstance(out, torch.Tensor):
            maps[name] = out[0].float().numpy()
            return
        for index, tensor in enumerate(out):
            if isinstance(tensor, torch.Tensor) and tensor.ndim == 4 and tensor is not inputs[0] and (
                    tensor.shape[-1] * tensor.shape[-2] > 1 and tensor.shape[1] > 0):
                maps[f"{name} {index} (1/{image.shape[-1] // tensor.shape[-1]})"] = tensor[0].float().numpy()

    handles = [module.register_forward_hook(lambda _m, inputs, out, name=name: record(name, inputs, out))
               for name, module in model.stages().items()]
    try:
        torch_logits(model)(image[None])
    finally:
        for handle in handles:
            handle.remove()
    return maps


def augmentation_panel(model: nn.Module, dataset: SegmentationDataset, index: int, threshold: float) -> dict:
    """One test image under each of :data:`AUGMENTATION_VERSIONS`, predictions mapped back."""
    image, mask = dataset.load(index)
    tensor = _model_input(dataset, image, mask)
    display = torch.from_numpy(image).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    versions = []
    for name in AUGMENTATION_VERSIONS:
        forward, inverse = DIHEDRAL[name]
        probabilities = torch.sigmoid(inverse(torch_logits(model)(forward(tensor))))[0, 0]
        predicted = (probabilities > threshold).numpy()
        augmented = forward(display)[0].permute(1, 2, 0).numpy()
        versions.append((name, augmented, predicted, _iou(mask.astype(bool), predicted)))
    return {"id": dataset.samples[index].id, "image": image, "truth": mask.astype(bool), "versions": versions}


def _metrics_table(metrics: dict, tta: dict | None) -> str:
    columns = [("plain, per-image", metrics["per_image"]), ("plain, dataset", metrics["dataset"])]
    if tta:
        columns += [(f"TTA ({len(tta['transforms'])}), per-image", tta["per_image"]),
                    (f"TTA ({len(tta['transforms'])}), dataset", tta["dataset"])]
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    rows = "".join(
        f"<tr><td>{score}</td>" + "".join(f"<td>{values[score]:.4f}</td>" for _, values in columns) + "</tr>"
        for score in SCORES
    )
    extra = [(f"test loss ({metrics.get('loss_name') or 'none'})", "loss"), ("average precision", "average_precision"),
             ("ROC AUC", "roc_auc")]
    for label, key in extra:
        cells = "".join(_value_cell(result, key) + "<td></td>" for result in ([metrics, tta] if tta else [metrics]))
        rows += f"<tr><td>{label}</td>{cells}</tr>"
    return f"<table><tr><th>score</th>{head}</tr>{rows}</table>"


def _value_cell(result: dict, key: str) -> str:
    """A table cell with ``result[key]``, or "undefined" and the reason when it has none."""
    value = result.get(key)
    if value is not None:
        return f"<td>{value:.4f}</td>"
    reason = result.get("undefined", {}).get(key, "not computed")
    return f'<td title="{html.escape(reason)}">undefined ({html.escape(reason)})</td>'


def _selection_fact(metrics: dict) -> str:
    selection, threshold = metrics.get("selection") or {}, metrics.get("threshold") or {}
    chosen = (f"best.pt: epoch {selection['epoch']} by validation {selection['metric']} {selection['score']:.4f}"
              if selection.get("split") else f"best.pt: epoch {selection.get('epoch', '?')} (no validation split: the last)")
    stopped = ", stopped early" if metrics.get("stopped_early") else ""
    if selection.get("dice_ci95"):
        low, high = selection["dice_ci95"]
        others = selection.get("epochs_within_ci95") or []
        chosen += (f" (validation Dice 95% bootstrap interval {low:.3f}-{high:.3f}"
                   + (f"; {len(others)} other evaluated epoch(s) score inside it ({', '.join(map(str, others[-10:]))}): "
                      "the validation split cannot tell them apart" if others else "") + ")")
    tuned = " (tuned on validation)" if threshold.get("tuned_on") else ""
    return f"{chosen}{stopped}; threshold {threshold.get('value', metrics['test']['threshold'])}{tuned}"


def write_index(run_dir: Path, metrics: dict, config: dict, environment: dict | None) -> Path:
    """index.html: run facts, how the model was chosen, the test metrics table and every figure."""
    model, data, train = config["model"], config["data"], config["train"]
    test = metrics["test"]
    facts = [
        describe(ModelConfig(**model)),
        f"{data['image_size']}x{data['image_size']} px, data {html.escape(str(data['root']))}",
        f"{metrics.get('epochs_trained', train['epochs'])} of {train['epochs']} epochs, batch {train['batch_size']} "
        f"per process, {train['optimizer']} lr {train['lr']} ({train['scheduler']}), loss {train['loss']}",
        _selection_fact(metrics),
        f"{test['num_images']} test images, evaluated once with the selected weights",
    ]
    if environment:
        facts.append(f"{environment['num_processes']} process(es) on {environment['device']}, "
                     f"mixed precision {environment['mixed_precision']}, torch {environment['packages'].get('torch')}")
    run = RunDir(run_dir)
    per_image = (f'<p>Scores of every validation and test image: <a href="{run.per_image.name}">{run.per_image.name}</a></p>'
                 if run.per_image.is_file() else "")
    figures = "".join(
        f'<figure><img src="{name}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for name, caption in FIGURES.items() if (run_dir / name).is_file()
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kvseg run {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style></head><body>
<h1>kvseg run {html.escape(run_dir.name)}</h1>
<ul>{''.join(f'<li>{fact}</li>' for fact in facts)}</ul>
<h2>Test metrics (epoch {metrics.get('epoch', '?')})</h2>
{_metrics_table(test, metrics.get("test_tta"))}
{per_image}
<h2>Figures</h2>
{figures}
</body></html>
"""
    write_text(run.index, page)
    return run.index


def write_report(run_dir: str | Path, data_dir: str | None = None, train_images: int = 4, test_images: int = 8) -> list[Path]:
    """(Re)create every figure and index.html of ``run_dir``; returns the files written.

    Reads metrics.json and per_image.csv; for a run without them, the best checkpoint is evaluated on
    the test split here. A figure that cannot be written (a full disk: :class:`~kvseg.files.WriteError`)
    is named in one warning line and left out; the other figures and index.html are still written.

    Raises:
        CheckpointError: the run folder or its best checkpoint is missing.
    """
    run = RunDir(run_dir)
    model, cfg, payload = run.load_model()
    datasets = eval_datasets(cfg, run, data_dir)
    train_set, test_set = datasets["train"], datasets["test"]
    rows = [row for row in run.read_per_image() if row["split"] == "test"]
    if run.metrics.is_file():
        metrics = json.loads(run.metrics.read_text())
    else:
        result = evaluate(torch_logits(model), DataLoader(test_set, batch_size=cfg.train.batch_size),
                          threshold_of(payload), build_loss(cfg.train), cfg.train.loss)
        metrics = {"test": result.to_json(), "epoch": payload.get("epoch"), "selection": (payload.get("metrics") or {}).get(
            "selection"), "threshold": {"value": threshold_of(payload)}}
        rows = metrics["test"].pop("images")
    test = metrics["test"]
    threshold = test["threshold"]
    history = json.loads(run.history.read_text()) if run.history.is_file() else []
    written: list[Path] = []

    def draw(name: str, write, *data, **options) -> None:
        """``write(*data, RUN/name, **options)``; a failed write is one warning, and the report goes on."""
        try:
            written.append(write(*data, run.path / name, **options))
        except WriteError as exc:
            logger.warning(f"warning: {exc}; the report goes on without {name}")

    draw("metrics.png", plot_metrics, test)
    draw("confusion_matrix.png", plot_confusion_matrix, test, class_name=cfg.data.class_name)
    if history:
        draw("loss_curve.png", plot_loss_curve, history)
    draw("pr_roc.png", plot_pr_roc, test)  # "undefined" and why, where a curve is missing

    iou_of = {row["id"]: row["iou"] for row in rows}
    test_index = {sample.id: i for i, sample in enumerate(test_set.samples)}
    worst = sorted(test_index, key=lambda sample_id: iou_of.get(sample_id, 0.0))[:test_images]
    shown_rows = []
    for index in range(min(train_images, len(train_set))):
        shown = _predicted(model, train_set, index, threshold)
        shown_rows.append({**shown, "title": f"train {train_set.samples[index].id}: IoU {shown['iou']:.3f}"})
    for sample_id in worst:
        shown = _predicted(model, test_set, test_index[sample_id], threshold)
        shown_rows.append({**shown, "title": f"test {sample_id}: IoU {shown['iou']:.3f}"})
    draw("predictions.png", plot_predictions, shown_rows, class_name=cfg.data.class_name)
    draw("augmentations.png", plot_augmentations, [augmentation_panel(model, test_set, i, threshold)
                                                   for i in range(min(3, len(test_set)))])
    draw("feature_maps.png", plot_feature_maps, feature_maps(model, test_set[0][0]))
    environment = json.loads(run.environment.read_text()) if run.environment.is_file() else None
    try:
        written.append(write_index(run.path, metrics, config_to_dict(cfg), environment))
    except WriteError as exc:
        logger.warning(f"warning: {exc}; the figures are written, the page showing them is not")
    return written
