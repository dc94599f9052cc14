"""The checkpoint policy of a run: which epoch becomes ``best.pt``, and when training stops early.

Validation alone decides (``train.select_metric``); the test split is never seen here.
:mod:`kvseg.runs.folder` names the files, :class:`CheckpointSaver` decides what goes into them and when.
"""

from __future__ import annotations

import torch

from kvseg.config import Config
from kvseg.evaluation.evaluate import EvalResult
from kvseg.runs.checkpoint import save_model_checkpoint
from kvseg.runs.folder import Progress, RunDir


class CheckpointSaver:
    """What is written when: ``last.pt`` after every epoch, ``best.pt`` when the validation score improves,
    and with ``keep_every`` k the weights of every k-th epoch (for learning curves drawn after training).

    ``metric`` is ``"dice"`` or ``"iou"`` (validation per-image mean, higher is better) or ``"loss"``
    (lower is better). With ``metric=None`` (no validation split) every epoch becomes the best, so
    ``best.pt`` is the last epoch. The test split is never seen here.
    """

    def __init__(self, run: RunDir, progress: Progress, metric: str | None, keep_every: int = 0) -> None:
        self.run, self.progress, self.metric, self.keep_every = run, progress, metric, keep_every

    def score(self, result: EvalResult) -> float:
        return result.loss if self.metric == "loss" else getattr(result.per_image, self.metric)

    def improves(self, result: EvalResult | None) -> bool:
        if self.metric is None:
            return True
        if result is None:
            return False
        best, value = self.progress.best_score, self.score(result)
        return best is None or (value < best if self.metric == "loss" else value > best)

    def save(self, model: torch.nn.Module, cfg: Config, epoch: int, result: EvalResult | None, write: bool) -> bool:
        """Record ``epoch`` and write its checkpoints when ``write`` (the main process); True when it became the best.

        Call it on every process, so that all of them agree on the best epoch and on early stopping.
        """
        improved = self.improves(result)
        if improved:
            self.progress.best_score = self.score(result) if self.metric and result is not None else None
            self.progress.best_epoch = epoch
        if write:
            summary = _summary(result)
            save_model_checkpoint(self.run.last, model, cfg, epoch, summary)
            if improved:
                save_model_checkpoint(self.run.best, model, cfg, epoch, {**(summary or {}), "selection": self.selection()})
            if self.keep_every and epoch % self.keep_every == 0:
                save_model_checkpoint(self.run.epoch_checkpoint(epoch), model, cfg, epoch, summary)
        return improved

    def selection(self) -> dict:
        """How best.pt was chosen: epoch, split, metric and score."""
        if self.metric is None:
            return {"epoch": self.progress.best_epoch, "split": None, "metric": None, "score": None,
                    "rule": "no validation split: the last epoch"}
        return {"epoch": self.progress.best_epoch, "split": "validation", "metric": f"per-image {self.metric}"
                if self.metric != "loss" else "loss", "score": self.progress.best_score}

    def patience_left(self, patience: int, eval_every: int) -> bool:
        """False once ``patience`` evaluations in a row have not improved on the best (0: never stop)."""
        if not patience or self.metric is None or self.progress.best_epoch is None:
            return True
        return self.progress.epoch - self.progress.best_epoch < patience * eval_every


def _summary(result: EvalResult | None) -> dict | None:
    """An evaluation without its per-image rows and curves, as kept inside a checkpoint."""
    if result is None:
        return None
    return {k: v for k, v in result.to_json().items() if k not in ("images", "curves")}
