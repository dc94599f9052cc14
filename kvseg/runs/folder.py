"""A run folder and every file in it: names, creation, locking, resume state, checkpoints, finding runs.

This is the only module that spells a file name inside a run folder (the report's figures are
named by :mod:`kvseg.evaluation.report`). Layout, as the README describes it::

    RUN/config.yaml  train.txt  val.txt  test.txt  environment.json  history.json  metrics.json  plan.yaml
    RUN/per_image.csv  index.html  logs/                 (logs/: experiment trackers)
    RUN/checkpoints/best.pt  last.pt  state/       (state/: accelerate's save_state + progress.json)
    RUN/model.onnx  model_fp16.onnx  model_int8.onnx  export.json  benchmark.json  benchmark.md
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn

from kvseg.config import Config, config_to_yaml
from kvseg.data.folder import find_samples
from kvseg.data.splits import Split, resolve_split, write_split
from kvseg.errors import CheckpointError
from kvseg.files import json_safe, replace_folder, write_json, write_text, writing_folder
from kvseg.runs.checkpoint import load_trained_model

PER_IMAGE_COLUMNS = ("id", "split", "iou", "dice", "loss", "true_fraction", "predicted_fraction")
ONNX_PRECISIONS = ("fp32", "fp16", "int8")


def precision_path(fp32_path: Path, precision: str) -> Path:
    """Where the model of ``precision`` lives beside the fp32 one: ``model.onnx`` -> ``model_int8.onnx``."""
    if precision not in ONNX_PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {', '.join(ONNX_PRECISIONS)}")
    return fp32_path if precision == "fp32" else fp32_path.with_name(f"{fp32_path.stem}_{precision}{fp32_path.suffix}")


@dataclass
class Progress:
    """What a resumed run needs besides the accelerate state: completed epochs and the best so far."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False
    stop_reason: str | None = None  # "budget" or "steps", when training ended before its epochs
    control: dict = field(default_factory=dict)  # optimizer steps done and budget seconds spent (kvseg.training.stopping)
    partial: dict = field(default_factory=dict)  # a preempted epoch: what of epoch + 1 is done (kvseg.training.train.EpochStats)


class RunDir:
    """The folder of one training run, ``output_dir/run_name``."""

    def __init__(self, path: str | Path | RunDir) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    __fspath__ = __str__

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / "config.yaml")
    environment = property(lambda self: self.path / "environment.json")
    plan = property(lambda self: self.path / "plan.yaml")  # train_ddp.py --plan auto: the plan and its reasons
    history = property(lambda self: self.path / "history.json")
    metrics = property(lambda self: self.path / "metrics.json")
    per_image = property(lambda self: self.path / "per_image.csv")
    logs = property(lambda self: self.path / "logs")
    index = property(lambda self: self.path / "index.html")
    export_report = property(lambda self: self.path / "export.json")
    benchmark_json = property(lambda self: self.path / "benchmark.json")
    benchmark_md = property(lambda self: self.path / "benchmark.md")
    checkpoints = property(lambda self: self.path / "checkpoints")
    best = property(lambda self: self.path / "checkpoints" / "best.pt")
    last = property(lambda self: self.path / "checkpoints" / "last.pt")

    def epoch_checkpoint(self, epoch: int) -> Path:
        """``checkpoints/epoch_0010.pt``: the weights kept after ``epoch`` (``train.keep_every``)."""
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def epoch_checkpoints(self) -> list[tuple[int, Path]]:
        """Every kept epoch checkpoint, by epoch."""
        return sorted((int(p.stem.split("_")[1]), p) for p in self.checkpoints.glob("epoch_*.pt"))

    def onnx(self, precision: str = "fp32") -> Path:
        """``model.onnx`` (fp32), ``model_fp16.onnx`` or ``model_int8.onnx``."""
        return precision_path(self.path / "model.onnx", precision)

    # -- the training state ------------------------------------------------------------------

    def state_dir(self) -> Path:
        """The accelerate state last saved (an epoch's end or a preempted step), else one a crashed swap left.

        Raises:
            CheckpointError: there is no completed epoch to resume from.
        """
        for candidate in (self.checkpoints / "state", self.checkpoints / "state.old"):
            if (candidate / "progress.json").is_file():
                return candidate
        raise CheckpointError(f"{self.path}: no checkpoint to resume from (expected checkpoints/state/progress.json)")

    def load_progress(self) -> tuple[Path, Progress]:
        """The state folder to load and the :class:`Progress` saved with it."""
        return (state := self.state_dir()), Progress(**json.loads((state / "progress.json").read_text()))

    def save_state(self, accelerator: Accelerator, progress: Progress) -> None:
        """``save_state`` into a fresh folder, flushed to disk, then swapped in: a crash, a kill or a full
        disk leaves the previous state whole.

        Every machine that keeps a copy of the run (:meth:`keeps_copy`) swaps its own folder.

        Raises:
            WriteError: a file of the state could not be written or flushed (disk full, I/O error); the
                half-written folder is removed and the previous ``checkpoints/state`` is intact.
        """
        tmp, current = self.checkpoints / "state.tmp", self.checkpoints / "state"
        writes = self.keeps_copy(accelerator)
        kept = "the previous state in checkpoints/state is kept" if current.is_dir() else "no state was saved before"
        if writes:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        with writing_folder(tmp, "the training state", kept, remove=writes):
            accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if writes:
            with writing_folder(tmp, "the training state", kept):
                write_json(tmp / "progress.json", json_safe(asdict(progress)))
                replace_folder(tmp, current)  # a crash in between leaves state.old, which state_dir falls back to
        accelerator.wait_for_everyone()

    def claim(self, accelerator: Accelerator) -> None:
        """Lock the folder for this run, and find out whether every machine sees the same folder.

        The main process takes an exclusive lock, held as long as this object lives, and writes a
        fresh token into the lock file; each process then reads the token from its own view of the
        folder. When every process reads it, the output folder is shared (one file system) and only
        the main process writes. When some machine does not, its first process keeps a local copy of
        the run (:meth:`keeps_copy`): the config, the split and ``checkpoints/state`` with the model,
        the optimizer and that machine's RNG states (accelerate's ``save_on_each_node``), so that
        ``--resume`` works on every machine from its own disk.

        Raises:
            CheckpointError: another process holds the lock.
        """
        token = [uuid.uuid4().hex]
        broadcast_object_list(token)
        held = [self._lock_with(token[0]) if accelerator.is_main_process else True]
        broadcast_object_list(held)
        if not held[0]:
            raise CheckpointError(f"{self.path}: another training process is still writing this run folder; stop it first")
        lock_file = self.path / ".lock"
        sees = [lock_file.is_file() and lock_file.read_text().strip() == token[0]]
        self.shared = all(gather_object(sees))
        accelerator.project_configuration.save_on_each_node = not self.shared
        if self.keeps_copy(accelerator) and not accelerator.is_main_process:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            if not self._lock_with(token[0]):
                raise CheckpointError(f"{self.path}: another training process is still writing this run folder here")

    def _lock_with(self, token: str) -> bool:
        """Take the exclusive lock (dies with the process, SIGKILL included) and write ``token``; False if held."""
        handle = open(self.path / ".lock", "a+")  # noqa: SIM115 - kept open until training ends
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.truncate(0)
        handle.write(token)
        handle.flush()
        self._lock = handle
        return True

    def keeps_copy(self, accelerator: Accelerator) -> bool:
        """True on the process that writes this machine's files: the main process, and without a shared
        output folder (see :meth:`claim`) the first process of every other machine."""
        return accelerator.is_main_process or (not getattr(self, "shared", True) and accelerator.is_local_main_process)

    # -- writing ----------------------------------------------------------------------------

    def write_start(self, cfg: Config, split: Split, environment: dict, plan: str | None = None) -> None:
        """The resolved config, the split, the environment record and the plan with its reasons, at the start of a run."""
        write_split(split, self.path)
        self.write_config(cfg)
        write_json(self.environment, environment)
        if plan is not None:
            write_text(self.plan, plan)

    def write_config(self, cfg: Config) -> None:
        """config.yaml: the resolved config of the run."""
        write_text(self.config, config_to_yaml(cfg))

    def write_history(self, history: list[dict]) -> None:
        write_json(self.history, json_safe(history))

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics, json_safe(metrics))

    def write_per_image(self, rows: list[dict]) -> None:
        """per_image.csv: one row per image of each evaluated split, with the keys of :data:`PER_IMAGE_COLUMNS`
        (a loss of None is written empty)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(PER_IMAGE_COLUMNS)
        for row in rows:
            writer.writerow([row["id"], row["split"]] + [
                "" if row[key] is None else f"{row[key]:.6f}" for key in PER_IMAGE_COLUMNS[2:]])
        write_text(self.per_image, out.getvalue())

    def read_per_image(self) -> list[dict]:
        """The rows of per_image.csv (numbers as floats; loss None when empty); [] when there is none."""
        if not self.per_image.is_file():
            return []
        return [{**row, **{k: float(row[k]) if row[k] else None for k in PER_IMAGE_COLUMNS[2:]}}
                for row in csv.DictReader(self.per_image.read_text().splitlines())]

    # -- reading back -----------------------------------------------------------------------

    def load_model(self) -> tuple[nn.Module, Config, dict]:
        """The selected (best) model in fp32 eval mode, its config and its checkpoint payload."""
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: run folder not found")
        if not self.best.is_file():
            raise CheckpointError(f"{self.best}: checkpoint not found (expected a run folder written by train_ddp.py)")
        return load_trained_model(self.best)

    def split(self, cfg: Config, data_dir: str | Path | None = None) -> Split:
        """The split this run used: its saved split files (else resolved from the data folder as training would)."""
        root = Path(data_dir or cfg.data.root)
        folder = self.path if (self.path / "test.txt").is_file() else root
        return resolve_split(folder, find_samples(root), cfg.data.split_seed, cfg.data.test_fraction, cfg.data.val_fraction,
                             cfg.data.val_min_images)


def blocking_file(path: Path) -> Path | None:
    """The first parent of ``path`` that exists and is a file, which stops ``path`` being made; None if none."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def create_run(output_dir: str | Path, run_name: str, accelerator: Accelerator) -> RunDir:
    """``output_dir/run_name`` (a time stamp when empty), the same on every process.

    Raises:
        CheckpointError: the folder already holds a run that can be resumed, or it cannot be made.
    """
    name = [run_name or datetime.now().strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(name)
    run = RunDir(Path(output_dir) / name[0])
    if accelerator.is_main_process:
        if run.last.is_file() or (run.checkpoints / "state").is_dir():
            raise CheckpointError(f"{run}: run folder already holds checkpoints; use --resume {run} (or --resume auto) "
                                  "or another name")
        try:
            run.checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            blocking = blocking_file(run.checkpoints)
            why = f"{blocking} is a file, not a folder" if blocking else (exc.strerror or str(exc))
            raise CheckpointError(f"{run}: cannot create the run folder here ({why}); expected --output-dir to be "
                                  "a folder that can be written") from None
    accelerator.wait_for_everyone()
    return run


def open_run(path: str | Path) -> RunDir:
    """An existing run folder.

    Raises:
        CheckpointError: ``path`` is not a folder written by ``train_ddp.py``.
    """
    run = RunDir(path)
    if not run.config.is_file():
        raise CheckpointError(f"{run}: not a run folder (expected config.yaml inside)")
    return run


def latest_run(output_dir: str | Path) -> RunDir:
    """The run folder under ``output_dir`` whose best checkpoint is newest.

    Raises:
        CheckpointError: no run with a best checkpoint is there.
    """
    candidates = sorted((RunDir(p) for p in Path(output_dir).glob("*/") if p.is_dir()), key=lambda r: r.path.name)
    finished = sorted((r for r in candidates if r.best.is_file()), key=lambda r: r.best.stat().st_mtime)
    if not finished:
        raise CheckpointError(
            f"{output_dir}: no run with checkpoints/best.pt found (train one first, or pass --run / --checkpoint)"
        )
    return finished[-1]
