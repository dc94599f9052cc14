"""train_ddp.py through its command line: accelerate launch with two CPU processes, resume, errors."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import psutil
import pytest
import torch

from conftest import REPO, TINY_TRAINING, cli_error
from kvseg.evaluation.report import FIGURES
from kvseg.evaluation.tta import ALL_TRANSFORMS
from kvseg.runs.checkpoint import load_trained_model
from kvseg.runs.folder import RunDir

TINY = TINY_TRAINING
TWO_CPU_PROCESSES = ["accelerate", "launch", "--config_file", str(REPO / "configs/accelerate/cpu_2proc.yaml")]
SINGLE = ["accelerate", "launch", "--num_processes", "1", "--cpu"]


def _command(launcher: list[str], *args: str) -> list[str]:
    return [*launcher, str(REPO / "train_ddp.py"), *args]


def run(launcher: list[str], *args: str, cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(_command(launcher, *args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _metrics(run_dir: Path) -> dict:
    """The test section of metrics.json."""
    return json.loads((run_dir / "metrics.json").read_text())["test"]


@pytest.fixture(scope="module")
def two_process_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("runs")
    result = run(TWO_CPU_PROCESSES, "--data-dir", str(synthetic_root), "--epochs", "2", "--output-dir", str(out),
                 "--run-name", "ddp", *TINY, "--set", "train.keep_every=1", cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "ddp", result


def test_two_processes_print_one_line_per_epoch(two_process_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    _, result = two_process_run
    lines = result.stdout.splitlines()
    assert "2 process(es)" in result.stdout
    for epoch in (1, 2):
        matching = [line for line in lines if line.startswith(f"Epoch [{epoch}/2], Average Loss: ")]
        assert len(matching) == 1, result.stdout  # main process only
        assert "images/s" in matching[0]
    assert sum(line.startswith("Test Loss (bce): ") for line in lines) == 1


def test_run_folder_contents(two_process_run: tuple[Path, subprocess.CompletedProcess], synthetic_root: Path) -> None:
    run_dir, _ = two_process_run
    for name in ("config.yaml", "train.txt", "val.txt", "test.txt", "environment.json", "history.json", "metrics.json",
                 "per_image.csv",
                 "loss_curve.png", "metrics.png", "checkpoints/last.pt", "checkpoints/best.pt",
                 "checkpoints/state/progress.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all(h["val_loss"] is not None for h in history)
    assert "test_loss" not in history[0]  # the test split is not looked at while training
    assert all(h["images_per_s"] > 0 and h["seconds"] > 0 for h in history)
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["num_processes"] == 2
    metrics = _metrics(run_dir)
    test_ids = (synthetic_root / "test.txt").read_text().split()
    rows = list(csv.DictReader((run_dir / "per_image.csv").read_text().splitlines()))
    ids = [row["id"] for row in rows if row["split"] == "test"]
    assert metrics["num_images"] == len(test_ids) == len(set(ids))  # no padded duplicates
    assert sorted(ids) == sorted(test_ids)
    val_ids = (run_dir / "val.txt").read_text().split()
    assert sorted(row["id"] for row in rows if row["split"] == "validation") == sorted(val_ids)
    assert not set(val_ids) & set(test_ids) and not set(val_ids) & set((run_dir / "train.txt").read_text().split())
    cm = metrics["confusion_matrix"]
    assert sum(cm.values()) == len(test_ids) * 64 * 64
    model, _, payload = load_trained_model(run_dir / "checkpoints" / "last.pt")
    assert payload["epoch"] == 2 and payload["config"]["model"]["base_channels"] == 8
    assert payload["metrics"]["per_image"]["dice"] == pytest.approx(history[1]["val_dice"])  # epoch 2's validation
    _, _, best = load_trained_model(run_dir / "checkpoints" / "best.pt")
    selection = best["metrics"]["selection"]
    chosen = max(history, key=lambda h: h["val_dice"])
    assert selection["split"] == "validation" and selection["epoch"] == chosen["epoch"] == best["epoch"]
    assert selection["score"] == pytest.approx(chosen["val_dice"])
    final = json.loads((run_dir / "metrics.json").read_text())["selection"]
    assert {k: final[k] for k in selection} == selection and final["epochs_within_ci95"] in ([], [1], [2])
    assert final["dice_ci95"][0] < selection["score"] < final["dice_ci95"][1]
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_training_writes_the_report_and_tta_metrics(two_process_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, _ = two_process_run
    for name in [*FIGURES, "index.html"]:
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tta, test = metrics["test_tta"], metrics["test"]
    assert tta["transforms"] == list(ALL_TRANSFORMS) and test["transforms"] == []
    assert 0 <= tta["per_image"]["iou"] <= 1
    assert tta["per_image"]["iou"] != test["per_image"]["iou"]  # really a different evaluation
    assert "TTA (8), per-image" in (run_dir / "index.html").read_text()


def test_the_test_split_never_influences_selection(two_process_run: tuple[Path, subprocess.CompletedProcess],
                                                   dataset_copy: Path, tmp_path: Path) -> None:
    """Inverting every test mask changes the test scores and nothing else: the same epochs, validation
    scores and chosen epoch. The same run logs to TensorBoard, whose event files must be readable."""
    for mask_id in (dataset_copy / "test.txt").read_text().split():
        path = dataset_copy / "masks" / f"{mask_id}.png"
        cv2.imwrite(str(path), 255 - cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    reference_dir, _ = two_process_run
    result = run(TWO_CPU_PROCESSES, "--data-dir", str(dataset_copy), "--epochs", "2", "--output-dir", str(tmp_path),
                 "--run-name", "ddp", *TINY, "--set", "train.trackers=[tensorboard]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    corrupted_dir = tmp_path / "ddp"
    keys = ("epoch", "train_loss", "val_loss", "val_dice", "best")
    history = [{k: h[k] for k in keys} for h in json.loads((corrupted_dir / "history.json").read_text())]
    reference = [{k: h[k] for k in keys} for h in json.loads((reference_dir / "history.json").read_text())]
    assert history == reference
    full, full_reference = (json.loads((d / "metrics.json").read_text()) for d in (corrupted_dir, reference_dir))
    assert full["selection"] == full_reference["selection"]
    assert full["validation"]["per_image"] == full_reference["validation"]["per_image"]
    assert full["test"]["per_image"]["iou"] != pytest.approx(full_reference["test"]["per_image"]["iou"], abs=1e-3)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(corrupted_dir / "logs" / "kvseg"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_dice")] == [1, 2]
    assert [e.value for e in events.Scalars("train_loss")] == pytest.approx([h["train_loss"] for h in history])


def test_two_processes_augment_on_the_device(synthetic_root: Path, tmp_path: Path) -> None:
    """uint8 batches augmented per batch in each process; the second process waits for the first's preparation."""
    result = run(TWO_CPU_PROCESSES, "--data-dir", str(synthetic_root), "--epochs", "1", "--output-dir", str(tmp_path),
                 "--run-name", "dev", *TINY, "--set", "data.augment_on=device", "--set", "eval.tta=[]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "dev"
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["augment_on"] == "device" and environment["num_processes"] == 2
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 1 and 0 < history[0]["train_loss"] < 5 and history[0]["val_dice"] is not None
    test_ids = (synthetic_root / "test.txt").read_text().split()
    assert _metrics(run_dir)["num_images"] == len(test_ids)
    assert sum(_metrics(run_dir)["confusion_matrix"].values()) == len(test_ids) * 64 * 64


def test_learning_curve_from_the_kept_epochs(two_process_run: tuple[Path, subprocess.CompletedProcess],
                                            tmp_path: Path) -> None:
    run_dir, _ = two_process_run
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*.pt")) == ["epoch_0001.pt", "epoch_0002.pt"]
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "learning_curve.py"), str(run_dir),
                             "--json", str(tmp_path / "curve.json"), "--png", str(tmp_path / "curve.png")],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    (entry,) = json.loads((tmp_path / "curve.json").read_text())
    points = entry["points"]
    assert [p["epoch"] for p in points] == [1, 2] and 0 < points[0]["training_minutes"] < points[1]["training_minutes"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    chosen = next(p for p in points if p["epoch"] == metrics["epoch"])
    # the same scoring; training scored under its bf16 autocast, the curve in fp32
    assert chosen["test_dice"] == pytest.approx(metrics["test"]["per_image"]["dice"], abs=2e-3)
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # about 20-70 s each on two cores; run with -m slow before a release
def test_one_process_evaluation_equals_two(two_process_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    run_dir, _ = two_process_run
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy"))
    two = _metrics(copy)
    # Resuming a finished run evaluates its final weights again, here in a single process.
    result = run(SINGLE, "--resume", str(copy), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    one = _metrics(copy)
    assert one["confusion_matrix"] == two["confusion_matrix"]
    assert one["num_images"] == two["num_images"]
    assert one["per_image"]["iou"] == pytest.approx(two["per_image"]["iou"], abs=1e-9)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert one["roc_auc"] == pytest.approx(two["roc_auc"], abs=1e-6)


@pytest.mark.slow  # about 20-70 s each on two cores; run with -m slow before a release
def test_resume_after_sigkill_matches_an_uninterrupted_run(synthetic_root: Path, tmp_path: Path) -> None:
    args = ["--data-dir", str(synthetic_root), "--epochs", "3", "--output-dir", str(tmp_path), "--batch-size", "2",
            *TINY[2:]]
    reference = run(TWO_CPU_PROCESSES, *args, "--run-name", "whole", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(_command(TWO_CPU_PROCESSES, *args, "--run-name", "killed"), cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = killed_dir / "checkpoints" / "state" / "progress.json"
    deadline = time.monotonic() + 180
    while not progress.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # SIGKILL the launcher and every process under it: torchrun starts the training processes in
    # sessions of their own, so killing the launcher's process group alone would leave them running.
    launcher = psutil.Process(process.pid)
    tree = [*launcher.children(recursive=True), launcher]
    for member in tree:
        member.kill()
    psutil.wait_procs(tree, timeout=30)
    process.wait()
    time.sleep(1)
    assert json.loads(progress.read_text())["epoch"] == 1  # nothing kept training after the kill
    assert not (killed_dir / "metrics.json").exists()

    resumed = run(TWO_CPU_PROCESSES, "--resume", str(killed_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and "Epoch [1/3]" not in resumed.stdout
    whole, again = _metrics(tmp_path / "whole"), _metrics(killed_dir)
    assert again["confusion_matrix"] == whole["confusion_matrix"]
    assert again["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    history = json.loads((killed_dir / "history.json").read_text())
    reference_history = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in reference_history], rel=1e-6)


def test_a_second_process_on_a_live_run_folder_is_refused(two_process_run: tuple[Path, subprocess.CompletedProcess],
                                                          tmp_path: Path) -> None:
    run_dir, _ = two_process_run
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy"))
    with open(copy / ".lock", "a+") as held:  # stands for a training process still running
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        message = cli_error("train_ddp", "--resume", str(copy))
    assert "another training process" in message


def test_trains_on_a_generic_folder_without_split_files(generic_root: Path, tmp_path: Path) -> None:
    before = sorted(p.relative_to(generic_root) for p in generic_root.rglob("*"))
    result = _python("--data-dir", str(generic_root), "--epochs", "1", "--output-dir", str(tmp_path), "--run-name", "g",
                     "--set", "data.test_fraction=0.4", "--set", "eval.tta=[]", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "split from seed 0" in result.stdout
    run_dir = tmp_path / "g"
    sizes = [len((run_dir / f"{name}.txt").read_text().split()) for name in ("train", "val", "test")]
    assert sizes == [2, 1, 2]  # 5 images: 2 drawn for test, then 1 of the other 3 for validation
    assert sorted(p.relative_to(generic_root) for p in generic_root.rglob("*")) == before  # data folder untouched
    assert _metrics(run_dir)["num_images"] == 2


def test_state_left_by_a_crashed_swap_is_still_found(tmp_path: Path) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "state.old").mkdir(parents=True)
    (checkpoints / "state.old" / "progress.json").write_text("{}")
    (checkpoints / "state.tmp").mkdir()  # half-written, no progress.json
    assert RunDir(tmp_path / "run").state_dir() == checkpoints / "state.old"


@pytest.mark.slow  # about 20-70 s each on two cores; run with -m slow before a release
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_root: Path, tmp_path: Path) -> None:
    first = _python("--data-dir", str(synthetic_root), "--epochs", "1", "--output-dir", str(tmp_path),
                    "--run-name", "run", "--set", "eval.tta=[]", *TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "run"
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    # A normalisation std of 1e-45 (0 in float32) turns the inputs infinite: the loss of epoch 2 is not finite.
    message = _error(_python("--resume", str(run_dir), "--epochs", "2", "--set", "augment.std=[1e-45,1e-45,1e-45]",
                             cwd=tmp_path, env={"PYTHONWARNINGS": "ignore::RuntimeWarning"}))
    assert "epoch 2: training loss is nan" in message and "epoch 1" in message
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    _, _, payload = load_trained_model(run_dir / "checkpoints" / "last.pt")
    assert payload["epoch"] == 1
    assert json.loads((run_dir / "checkpoints" / "state" / "progress.json").read_text())["epoch"] == 1


def _error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def _python(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_ddp.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=240, env={**os.environ, **(env or {})})


def test_missing_data_dir_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    message = _error(_python("--data-dir", str(tmp_path / "nope"), cwd=tmp_path))
    assert str(tmp_path / "nope") in message and "not found" in message
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "train.learning_rate=1"], "train.learning_rate"),
    (["--set", "train.lr=abc"], "train.lr"),
    (["--image-size", "70"], "data.image_size"),
])
def test_bad_config(tmp_path: Path, args: list[str], expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert expected in cli_error("train_ddp", *args)


def test_bad_config_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: many\n")
    message = cli_error("train_ddp", "--config", str(path))
    assert "bad.yaml" in message and "train.epochs" in message


def test_an_output_dir_under_a_file_is_one_line(synthetic_root: Path, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    message = cli_error("train_ddp", "--data-dir", str(synthetic_root), "--output-dir", str(tmp_path / "a_file" / "x"),
                        "--epochs", "1", *TINY)
    assert "cannot create the run folder" in message and "a_file is a file, not a folder" in message


def test_corrupt_image_names_the_file(dataset_copy: Path, tmp_path: Path) -> None:
    broken = dataset_copy / "images" / "synth0007.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    message = cli_error("train_ddp", "--data-dir", str(dataset_copy), "--epochs", "1", "--output-dir",
                        str(tmp_path / "runs"), *TINY)
    assert "synth0007.jpg" in message and "cannot decode" in message


def test_resume_errors(two_process_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    run_dir, _ = two_process_run
    assert "not a run folder" in cli_error("train_ddp", "--resume", str(tmp_path))
    copy = Path(shutil.copytree(run_dir, tmp_path / "copy"))
    message = cli_error("train_ddp", "--resume", str(copy), "--set", "model.base_channels=16")
    assert "cannot resume" in message
    shutil.rmtree(copy / "checkpoints" / "state")
    assert "no checkpoint to resume from" in cli_error("train_ddp", "--resume", str(copy))


@pytest.mark.slow  # two short trainings, about 45 s on two cores
def test_ablation_trains_each_variant_once_and_reads_validation_only(synthetic_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text("data:\n  image_size: 32\n  num_workers: 0\nmodel:\n  base_channels: 8\n  depth: 3\n"
                      "train:\n  batch_size: 8\n")
    command = [sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--data-dir", str(synthetic_root),
               "--output-dir", str(tmp_path / "abl"), "--config", str(config), "--epochs", "2", "--only", "recipe,bce",
               "--json", str(tmp_path / "abl.json"), "--md", str(tmp_path / "abl.md")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:] + first.stdout[-2000:]
    rows = json.loads((tmp_path / "abl.json").read_text())["rows"]
    for name in ("recipe", "bce"):
        history = json.loads((tmp_path / "abl" / name / "history.json").read_text())
        assert rows[name]["best_val_dice"] == max(h["val_dice"] for h in history)
        assert rows[name]["training_minutes"] == pytest.approx(sum(h["seconds"] for h in history) / 60)
    assert "| bce | loss BCE" in (tmp_path / "abl.md").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)  # finished variants are read
    assert again.returncode == 0 and "train_ddp.py" not in again.stdout
    assert json.loads((tmp_path / "abl.json").read_text())["rows"] == rows
    unknown = subprocess.run([*command[:-6], "--only", "nonsense"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown variant(s) nonsense" in unknown.stderr
