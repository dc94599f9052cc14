"""Video: python -m kvseg.predict on video files and live sources, the streaming pipeline, the benchmark row."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch

from conftest import REPO
from kvseg.bench.video import measure_video, video_markdown
from kvseg.cli import run_cli
from kvseg.commands.predict import main
from kvseg.config import AugmentConfig
from kvseg.data.augment import build_eval_transform
from kvseg.data.folder import read_image
from kvseg.deploy.backends import ort_cpu_backend
from kvseg.deploy.export import export_run
from kvseg.deploy.predict import Predictor
from kvseg.evaluation.overlay import overlay
from kvseg.runs.folder import RunDir
from kvseg.video.io import VideoInfo, VideoSource
from kvseg.video.segment import VideoOptions, segment_video

FPS = 25


def _write_video(path: Path, frames: list[np.ndarray], codec: str, fps: int = FPS, options: dict | None = None) -> Path:
    """``frames`` (RGB) encoded by ``codec``: ``ffv1`` (lossless RGB, MKV) or ``libx264`` (MP4)."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def _decode(path: Path) -> tuple[list[np.ndarray], Fraction, tuple[int, int]]:
    """Every frame (RGB), the average rate and (width, height) of a video file."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, stream.average_rate, (stream.width, stream.height)


def _grey(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


@pytest.fixture(scope="module")
def onnx_run(fresh_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run with its fp32 ONNX model (exported without verification, for speed)."""
    run = RunDir(shutil.copytree(fresh_run, tmp_path_factory.mktemp("video") / "run"))
    export_run(run.best, run.onnx("fp32"), run_dir=run.path, verify=False)
    return run.path


@pytest.fixture(scope="module")
def frames(synthetic_root: Path) -> list[np.ndarray]:
    """30 synthetic endoscopy frames, 80 x 64 px, RGB."""
    return [read_image(path) for path in sorted((synthetic_root / "images").iterdir())[:30]]


@pytest.fixture(scope="module")
def clip(frames: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``frames`` as a lossless FFV1 video ``clip.mkv``, and as PNG stills in ``stills/`` beside it."""
    folder = tmp_path_factory.mktemp("clip")
    for index, frame in enumerate(frames):
        (folder / "stills").mkdir(exist_ok=True)
        cv2.imwrite(str(folder / "stills" / f"frame_{index:06d}.png"), frame[..., ::-1])
    return _write_video(folder / "clip.mkv", frames, "ffv1")


def test_overlay_blends_each_layer_with_its_colour() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    truth, predicted = rng.random((48, 64)) < 0.5, rng.random((48, 64)) < 0.5
    alpha = 0.45
    expected = image.astype(np.float64)
    expected[predicted] = (1 - alpha) * expected[predicted] + alpha * np.array((255, 0, 80))
    out = overlay(image, None, predicted, alpha)
    assert np.abs(out.astype(int) - expected.round()).max() <= 1  # OpenCV rounds the same blend
    assert np.array_equal(out[~predicted], image[~predicted])
    layered = overlay(image, truth, predicted, alpha)
    missed = truth & ~predicted
    assert np.abs(layered[missed].astype(int) - ((1 - alpha) * image[missed] + alpha * np.array((0, 255, 0))).round()).max() <= 1
    assert np.array_equal(layered[~truth & ~predicted], image[~truth & ~predicted])


def test_the_lossless_clip_decodes_to_the_stills(clip: Path, frames: list[np.ndarray]) -> None:
    decoded, _, _ = _decode(clip)
    assert len(decoded) == len(frames) and all(np.array_equal(a, b) for a, b in zip(decoded, frames))


def _check_outputs(out: Path, stem: str, frames: list[np.ndarray]) -> dict:
    """The overlay has the clip's frame count, size and rate; masks equal still-image predict's exactly."""
    overlay_frames, rate, size = _decode(out / f"{stem}_overlay.mp4")
    assert len(overlay_frames) == len(frames) and rate == FPS and size == (80, 64)
    report = json.loads((out / f"{stem}.json").read_text())
    assert report["frames"] == len(frames) and report["source_fps"] == FPS and report["stopped"] == "end"
    assert set(report["ms_per_frame"]) == {"decode", "preprocess", "inference", "postprocess", "encode"}
    assert all(seconds > 0 for seconds in report["stage_s"].values())
    masks = []
    for index in range(len(frames)):
        from_video = _grey(out / f"{stem}_masks" / f"frame_{index:06d}.png")
        from_still = _grey(out / f"frame_{index:06d}_mask.png")
        assert np.array_equal(from_video, from_still), f"frame {index}"
        assert report["instrument_fraction"][index] == pytest.approx((from_video > 0).mean(), abs=1e-6)
        masks.append(from_video)
    fractions = [float((m > 0).mean()) for m in masks]
    assert max(fractions) > 0.01 and min(fractions) < 0.99  # masks with and without instrument: equality means something
    assert len({m.tobytes() for m in masks}) > 10
    return report


def test_onnx_video_masks_equal_predict_on_the_same_frames_as_stills(onnx_run: Path, clip: Path,
                                                                     frames: list[np.ndarray], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kvseg.predict", "--onnx", str(onnx_run / "model.onnx"), str(clip),
                             str(clip.parent / "stills"), "--out", str(tmp_path), "--save-masks"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(frames)} frames" in result.stdout
    report = _check_outputs(tmp_path, "clip", frames)
    assert report["model"] == str(onnx_run / "model.onnx") and report["flicker_smoothed"] is None


def test_pytorch_video_masks_equal_predict_on_the_same_frames_as_stills(fresh_run: Path, clip: Path,
                                                                        frames: list[np.ndarray], tmp_path: Path) -> None:
    main(["--run", str(fresh_run), str(clip), str(clip.parent / "stills"), "--out", str(tmp_path), "--save-masks"])
    _check_outputs(tmp_path, "clip", frames)


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_truncated_video_is_one_line_naming_the_frame_and_keeps_a_playable_overlay(
        onnx_run: Path, frames: list[np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture, container: str) -> None:
    whole = tmp_path / f"whole.{container}"
    if container == "mp4":  # the index first, as cameras that stream to disk write it, so that the start still opens
        _write_video(whole, frames, "libx264", options={"movflags": "+faststart"})
    else:
        _write_video(whole, frames, "ffv1")
    data = whole.read_bytes()
    broken = tmp_path / f"broken.{container}"
    broken.write_bytes(data[:len(data) * 6 // 10])
    status = run_cli(main, ["--onnx", str(onnx_run / "model.onnx"), str(broken), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1, error
    kept, _, _ = _decode(tmp_path / "out" / "broken_overlay.mp4")  # closed properly: every frame written plays
    assert 0 < len(kept) < len(frames)
    assert error[0].startswith(f"error: {broken}: frame {len(kept)}:") and "truncated" in error[0]
    report = json.loads((tmp_path / "out" / "broken.json").read_text())
    assert report["stopped"] == "error" and report["frames"] == len(kept) == len(report["instrument_fraction"])


def test_unreadable_video_and_missing_camera_are_one_line_each(onnx_run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    status = run_cli(main, ["--onnx", str(onnx_run / "model.onnx"), str(junk), "97", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(error) == 1
    assert f"{junk}: cannot open video" in error[0] and "camera 97: cannot open" in error[0]


class ListSource(VideoSource):
    """Frames from a list, optionally paced like a camera, optionally sending Ctrl-C to this process."""

    def __init__(self, images: list[np.ndarray], live: bool = False, interval: float = 0.0,
                 ctrl_c_after: int | None = None) -> None:
        height, width = images[0].shape[:2]
        self.images, self.interval, self.ctrl_c_after = images, interval, ctrl_c_after
        self.info = VideoInfo("list", width, height, Fraction(FPS), None if live else len(images), live)
        self.closed = False

    def __iter__(self) -> Iterator[np.ndarray]:
        for index, image in enumerate(self.images):
            if index == self.ctrl_c_after:
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(self.interval)
            yield image

    def close(self) -> None:
        self.closed = True


def _brightness_predictor(delay: float = 0.0) -> Predictor:
    """A stand-in model: the logit of every pixel is the image's mean normalised brightness times 4."""

    def logits(images: torch.Tensor) -> torch.Tensor:
        time.sleep(delay)
        return images.mean(dim=(1, 2, 3), keepdim=True).expand(len(images), 1, *images.shape[2:]) * 4

    return Predictor(logits, 32, build_eval_transform(AugmentConfig()), 0.5)


def test_smoothing_reduces_flicker(tmp_path: Path) -> None:
    bright, dark = np.full((32, 32, 3), 200, np.uint8), np.full((32, 32, 3), 90, np.uint8)
    alternating = [bright, dark] * 10  # the stand-in's mask is full, empty, full, ...: flicker 1
    plain = segment_video(_brightness_predictor(), ListSource(alternating), tmp_path / "plain.mp4")
    assert plain.flicker == pytest.approx(1.0) and plain.flicker_smoothed is None
    smoothed = segment_video(_brightness_predictor(), ListSource(alternating), tmp_path / "smooth.mp4",
                             options=VideoOptions(smooth=0.8))
    assert smoothed.flicker == pytest.approx(1.0)  # the model's own flicker, for comparison
    assert smoothed.flicker_smoothed < 0.2
    assert smoothed.instrument_fraction[-4:] == [1.0] * 4  # the average stays above the threshold


def test_live_source_that_outruns_the_model_drops_frames_and_keeps_real_time(tmp_path: Path) -> None:
    images = [np.full((32, 32, 3), 60 + 4 * i, np.uint8) for i in range(40)]  # 200 fps against a 40 ms model
    result = segment_video(_brightness_predictor(delay=0.04), ListSource(images, live=True, interval=0.005),
                           tmp_path / "live.mp4")
    assert result.dropped > 0 and result.frames + result.dropped == len(images)
    written, _, _ = _decode(tmp_path / "live.mp4")
    assert len(written) == result.frames


def test_ctrl_c_ends_the_video_cleanly(frames: list[np.ndarray], tmp_path: Path) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set in the main thread only")
    many = frames * 4
    source = ListSource(many, interval=0.01, ctrl_c_after=10)
    result = segment_video(_brightness_predictor(), source, tmp_path / "stopped.mp4")
    assert result.stopped == "ctrl-c" and 10 <= result.frames < len(many) and source.closed
    written, _, _ = _decode(tmp_path / "stopped.mp4")
    assert len(written) == result.frames


def test_memory_does_not_grow_with_the_length_of_the_video(onnx_run: Path, tmp_path: Path) -> None:
    """Peak RSS while segmenting 300 frames of 320 x 180 exceeds that of 30 frames by less than a quarter
    of what holding the 270 extra decoded frames would take.

    Both run in one fresh process, after model loading and a warm-up; each peak is the kernel's
    high-water mark, reset before each video (ru_maxrss would include the parent's size at fork). The model
    is slowed below the decoder's pace, so that a reader not held back by a bounded queue would
    decode ahead and fill memory.
    """
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc to reset the peak RSS")
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.integers(0, 255, (180, 320, 3), dtype=np.uint8), (0, 0), 3)  # cheap to encode
    for count in (30, 300):
        _write_video(tmp_path / f"clip{count}.mp4", [np.roll(base, 4 * i, axis=1) for i in range(count)], "libx264")
    script = textwrap.dedent(f"""
        import dataclasses, json, re, sys, time
        from pathlib import Path
        from kvseg.deploy.predict import onnx_predictor
        from kvseg.video.segment import VideoOptions, segment_video
        from kvseg.video.io import open_source

        def status_kib(key):
            return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

        model = onnx_predictor({str(onnx_run / "model.onnx")!r})
        def slow(images):
            time.sleep(0.005)
            return model.logits(images)
        predictor = dataclasses.replace(model, logits=slow)
        out = Path({str(tmp_path / "out.mp4")!r})
        segment_video(predictor, open_source(sys.argv[1]), out, options=VideoOptions(max_frames=5), progress=False)
        for clip in sys.argv[1:]:
            before = status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the current RSS
            result = segment_video(predictor, open_source(clip), out)
            print(json.dumps({{"frames": result.frames, "growth_kib": status_kib("VmHWM") - before}}))
    """)
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "clip30.mp4"), str(tmp_path / "clip300.mp4")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    measured = [json.loads(line) for line in run.stdout.strip().splitlines()[-2:]]
    assert [m["frames"] for m in measured] == [30, 300]
    growth = {30: measured[0]["growth_kib"], 300: measured[1]["growth_kib"]}
    held = 270 * 320 * 180 * 3 / 1024  # KiB that 270 more decoded frames would take
    assert growth[300] - growth[30] < held / 4, (growth, held)


def test_benchmark_video_row(onnx_run: Path, frames: list[np.ndarray]) -> None:
    _, cfg, _ = RunDir(onnx_run).load_model()
    backend = ort_cpu_backend("ort-fp32", RunDir(onnx_run).onnx("fp32"))
    video = measure_video({"ort-fp32": backend}, cfg, frames[:4], frames=12, threshold=0.5, size=(128, 72))
    row = video["rows"]["ort-fp32"]
    assert row["frames"] == 12 and row["fps"] > 0 and row["error"] is None
    assert row["real_time_factor_25"] == pytest.approx(row["fps"] / 25)
    assert row["real_time_factor_30"] == pytest.approx(row["fps"] / 30)
    assert row["limiting_stage"] in {"decode", "preprocess", "inference", "postprocess", "encode"}
    assert len(row["load_average_before"]) == 3
    table = "\n".join(video_markdown(video))
    assert "| ort-fp32 |" in table and "128x72" in table


@pytest.mark.slow
def test_benchmark_command_adds_the_video_section(onnx_run: Path, tmp_path: Path) -> None:
    run_dir = Path(shutil.copytree(onnx_run, tmp_path / "run"))
    result = subprocess.run([sys.executable, str(REPO / "benchmark.py"), "--run", str(run_dir), "--backends", "ort-fp32",
                             "--train-steps", "0", "--loader-seconds", "0", "--iters", "1", "--warmup", "0",
                             "--batch-sizes", "1", "--video", "8"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "benchmark.json").read_text())
    assert report["video"]["clip"]["width"] == 1280 and report["video"]["rows"]["ort-fp32"]["frames"] == 8
    assert "## Video, end to end" in (run_dir / "benchmark.md").read_text()
