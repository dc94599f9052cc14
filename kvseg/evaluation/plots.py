"""Figures of a run: loss curve, metrics, confusion matrix, PR/ROC, feature maps, predictions, augmentations.

They follow the study's figures 1-6; :mod:`kvseg.evaluation.report` computes what they show and writes them.
Figures are built with matplotlib's object API (:class:`matplotlib.figure.Figure`, no pyplot), which
needs no display and changes no global backend: importing this module has no side effect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from kvseg.evaluation.metrics import SCORES
from kvseg.evaluation.overlay import overlay
from kvseg.files import replacing


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)


def plot_loss_curve(history: list[dict], path: str | Path) -> Path:
    """Train loss per epoch, validation loss where evaluated, and the selected epoch."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    validated = [h for h in history if h.get("val_loss") is not None]
    if validated:
        ax.plot([h["epoch"] for h in validated], [h["val_loss"] for h in validated], marker="s", label="validation")
    best = [h["epoch"] for h in history if h.get("best")]
    if best:
        ax.axvline(best[-1], color="grey", linestyle=":", label=f"selected (epoch {best[-1]})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path, dpi=120)


def plot_metrics(metrics: dict, path: str | Path) -> Path:
    """Bar chart of every score, per-image mean beside dataset-level, plus AP and ROC AUC."""
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    names = list(SCORES)
    x = range(len(names))
    width = 0.38
    per_image = [metrics["per_image"][n] for n in names]
    dataset = [metrics["dataset"][n] for n in names]
    ax.bar([i - width / 2 for i in x], per_image, width, label="per-image mean")
    ax.bar([i + width / 2 for i in x], dataset, width, label="dataset-level")
    extra = {"AP": metrics["average_precision"], "ROC AUC": metrics["roc_auc"]}
    for offset, (name, value) in enumerate(extra.items(), start=len(names)):
        if value is None:  # undefined, e.g. no foreground pixel in the split: say so instead of a bar
            ax.annotate("undefined", (offset, 0.02), ha="center", va="bottom", fontsize=7, rotation=90)
        else:
            ax.bar(offset, value, width, color="tab:green")
        names.append(name)
    for bar in ax.patches:
        ax.annotate(f"{bar.get_height():.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylim(0, 1.2)
    loss = f", {metrics['loss_name']} loss {metrics['loss']:.4f}" if metrics.get("loss") is not None else ""
    ax.set_title(f"Test metrics ({metrics['num_images']} images{loss})")
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    return _save(fig, path, dpi=120)


def plot_confusion_matrix(metrics: dict, path: str | Path, class_name: str = "instrument") -> Path:
    """The 2x2 pixel confusion matrix of the test split, counts and row-normalised rates (Fig. 3)."""
    cm = metrics["confusion_matrix"]
    counts = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]], dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(4.6, 4))
    ax = fig.subplots()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, f"{int(value):,}\n{rates[i, j]:.2%}", ha="center", va="center",
                color="white" if rates[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks([0, 1], ["background", class_name])
    ax.set_yticks([0, 1], ["background", class_name])
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title("Pixel confusion matrix (test)")
    return _save(fig, path, dpi=120)


def plot_pr_roc(metrics: dict, path: str | Path) -> Path:
    """Precision-recall and ROC curves of the test pixels, AP and AUC in the legends.

    Where AP or AUC is undefined (a split without foreground or without background pixels) the
    panel says so, with the reason from ``metrics["undefined"]``, instead of a curve.
    """
    curves = metrics.get("curves") or {}
    fig = Figure(figsize=(9, 4))
    pr, roc = fig.subplots(1, 2)
    panels = ((pr, "average_precision", "AP", "recall", "precision"), (roc, "roc_auc", "AUC", "fpr", "tpr"))
    for ax, key, label, x, y in panels:
        value = metrics.get(key)
        if value is not None and curves.get(x):
            ax.plot(curves[x], curves[y], label=f"{label} = {value:.4f}")
            ax.legend(loc="lower right" if ax is roc else "lower left")
        else:  # undefined, or defined without curve points (a split without background pixels has no ROC)
            reason = (metrics.get("undefined") or {}).get(key, "")
            text = f"{label} undefined:\n{reason}" if value is None else f"{label} = {value:.4f}\n(no curve points stored)"
            ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes,
                    bbox={"facecolor": "white", "edgecolor": "grey"})
    pr.set_xlabel("recall")
    pr.set_ylabel("precision")
    pr.set_title("Precision-recall")
    roc.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    roc.set_xlabel("false positive rate")
    roc.set_ylabel("true positive rate")
    roc.set_title("ROC")
    for ax in (pr, roc):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    return _save(fig, path, dpi=120)


def plot_feature_maps(maps: dict[str, np.ndarray], path: str | Path, channels: int = 6) -> Path:
    """One row per layer: its ``channels`` strongest channels (largest mean |activation|) (Fig. 4).

    ``maps`` holds layer name -> activation (C, H, W) for one image, in network order.
    """
    fig = Figure(figsize=(1.6 * channels, 1.75 * len(maps)))
    axes = fig.subplots(len(maps), channels, squeeze=False)
    for row, (name, activation) in zip(axes, maps.items()):
        strength = np.abs(activation).mean(axis=(1, 2))
        for column, (ax, channel) in enumerate(zip(row, np.argsort(strength)[::-1][:channels])):
            ax.imshow(activation[channel], cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: ch {channel}" if column == 0 else f"ch {channel}", fontsize=7)
        row[0].set_ylabel(f"{name}\n{activation.shape[1]}x{activation.shape[2]}", fontsize=8)
    fig.suptitle("Feature maps: strongest channels per layer")
    return _save(fig, path, dpi=110)


def plot_predictions(rows: list[dict], path: str | Path, columns: int = 4, class_name: str = "instrument") -> Path:
    """A grid of images with ground truth and prediction overlaid, IoU in each title.

    ``rows`` items: ``image`` (H, W, 3) uint8, ``truth`` and ``predicted`` (H, W), ``title``.
    """
    count = len(rows)
    lines = (count + columns - 1) // columns
    fig = Figure(figsize=(3 * columns, 3.1 * lines))
    axes = fig.subplots(lines, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        ax.imshow(overlay(row["image"], row["truth"], row["predicted"]))
        ax.set_title(row["title"], fontsize=8)
    fig.suptitle(f"Yellow: {class_name} found; green: missed; magenta: false alarm", fontsize=10)
    return _save(fig, path, dpi=110)


def plot_augmentations(panels: list[dict], path: str | Path) -> Path:
    """For each image: its augmented versions (top) and each version's prediction mapped back (bottom) (Fig. 6).

    ``panels`` items: ``id``, ``image``, ``truth`` and ``versions``: list of (name, augmented image,
    prediction mapped back to the original orientation, IoU).
    """
    columns = len(panels[0]["versions"])
    fig = Figure(figsize=(2.4 * columns, 4.9 * len(panels)))
    axes = fig.subplots(2 * len(panels), columns, squeeze=False)
    for index, panel in enumerate(panels):
        for column, (name, augmented, predicted, iou) in enumerate(panel["versions"]):
            top, bottom = axes[2 * index, column], axes[2 * index + 1, column]
            top.imshow(augmented)
            top.set_title(f"{panel['id']}: {name}", fontsize=8)
            bottom.imshow(overlay(panel["image"], panel["truth"], predicted))
            bottom.set_title(f"mapped back, IoU {iou:.3f}", fontsize=8)
            top.axis("off")
            bottom.axis("off")
    fig.suptitle("Test images, their rotated / flipped / transposed versions, and the predictions", fontsize=10)
    return _save(fig, path, dpi=110)
