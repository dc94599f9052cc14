"""Figures of a run: the loss curve (the study's Fig. 1) and the metric bar chart (Fig. 2)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kvseg.metrics import SCORES  # noqa: E402


def plot_loss_curve(history: list[dict], path: str | Path) -> Path:
    """Train loss per epoch, and test loss at the epochs where the test split was evaluated."""
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    tested = [h for h in history if h.get("test_loss") is not None]
    if tested:
        ax.plot([h["epoch"] for h in tested], [h["test_loss"] for h in tested], marker="s", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("BCE loss")
    ax.set_title("Loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_metrics(metrics: dict, path: str | Path) -> Path:
    """Bar chart of every score, per-image mean beside dataset-level, plus AP and ROC AUC."""
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(SCORES)
    x = range(len(names))
    width = 0.38
    per_image = [metrics["per_image"][n] for n in names]
    dataset = [metrics["dataset"][n] for n in names]
    ax.bar([i - width / 2 for i in x], per_image, width, label="per-image mean")
    ax.bar([i + width / 2 for i in x], dataset, width, label="dataset-level")
    extra = {"AP": metrics["average_precision"], "ROC AUC": metrics["roc_auc"]}
    for offset, (name, value) in enumerate(extra.items(), start=len(names)):
        ax.bar(offset, value if value == value else 0.0, width, color="tab:green")
        names.append(name)
    for bar in ax.patches:
        ax.annotate(f"{bar.get_height():.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylim(0, 1.08)
    ax.set_title(f"Test metrics ({metrics['num_images']} images, loss {metrics['loss']:.4f})")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
