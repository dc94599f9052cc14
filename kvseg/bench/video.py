"""The benchmark's video row: end-to-end frames per second on a 720p clip, per backend.

A clip made from the run's test images (each shown for ten frames while a 16:9 window pans over it,
H.264 at 25 fps) is segmented by :func:`kvseg.video.segment.segment_video` as ``python -m kvseg.predict``
segments a video (decode, preprocess, inference, postprocess, overlay encode, batch 1), once per
backend. The real-time factor is the processed fps over 25 and over 30 fps: at 1.0 or more the model
keeps up with such a stream. The load average before and after each row is recorded, since the
stages share the machine's cores with whatever else runs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from kvseg.config import Config
from kvseg.data.augment import build_eval_transform
from kvseg.data.folder import read_image
from kvseg.deploy.backends import Backend
from kvseg.deploy.predict import Predictor
from kvseg.video.io import FileSource, VideoWriter
from kvseg.video.segment import STAGES, VideoOptions, segment_video

logger = logging.getLogger(__name__)

CLIP_SIZE = (1280, 720)
CLIP_FPS = 25
FRAMES_PER_IMAGE = 10
REAL_TIME_FPS = (25, 30)
CLIP_IMAGES = 25  # test images in the clip: 250 frames before it repeats
CLIP_X264 = {"preset": "veryfast", "crf": "20"}  # CABAC and B-frames, as recorders write, unlike the overlay's ultrafast


def clip_frames(images: Sequence[np.ndarray], count: int, width: int, height: int) -> Iterator[np.ndarray]:
    """``count`` RGB frames: each image in turn for :data:`FRAMES_PER_IMAGE` frames, a window of the
    frame's aspect ratio panning down over it, resized to ``width`` x ``height``."""
    for index in range(count):
        image = images[(index // FRAMES_PER_IMAGE) % len(images)]
        h, w = image.shape[:2]
        window = min(h, round(w * height / width))
        top = (h - window) * (index % FRAMES_PER_IMAGE) // max(1, FRAMES_PER_IMAGE - 1)
        yield cv2.resize(image[top:top + window], (width, height), interpolation=cv2.INTER_LINEAR)


def write_clip(images: Sequence[np.ndarray], path: Path, count: int, size: tuple[int, int] = CLIP_SIZE,
               fps: int = CLIP_FPS) -> Path:
    """Write :func:`clip_frames` as an H.264 MP4 encoded as recorders do (:data:`CLIP_X264`)."""
    writer = VideoWriter(path, *size, Fraction(fps), x264=CLIP_X264)
    try:
        for frame in clip_frames(images, count, *size):
            writer.write(frame)
    finally:
        writer.close()
    return path


def measure_video(backends: dict[str, Backend], cfg: Config, images: Sequence[np.ndarray], frames: int,
                  threshold: float, size: tuple[int, int] = CLIP_SIZE) -> dict:
    """End-to-end fps, per-stage ms and the limiting stage of each backend on one clip; see the module doc."""
    transform = build_eval_transform(cfg.augment)
    report = {"clip": {"width": size[0], "height": size[1], "fps": CLIP_FPS, "frames": frames,
                       "images": len(images), "codec": f"H.264 (libx264 {CLIP_X264['preset']})"}, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="kvseg-video-") as tmp:
        clip = write_clip(images, Path(tmp) / "clip.mp4", frames, size)
        for name, backend in backends.items():
            predictor = Predictor(backend.logits, cfg.data.image_size, transform, threshold)
            predictor.probabilities(images[:1])  # warm-up: first-call allocations are not the stream's pace
            load_before = os.getloadavg()
            result = segment_video(predictor, FileSource(str(clip)), Path(tmp) / f"{name}.mp4",
                                   options=VideoOptions(batch_size=1), progress=False)
            row = {"frames": result.frames, "fps": result.processed_fps,
                   **{f"real_time_factor_{rate}": result.processed_fps / rate for rate in REAL_TIME_FPS},
                   "ms_per_frame": result.ms_per_frame(), "thread_ms_per_frame": result.thread_ms_per_frame(),
                   "limiting_stage": result.limiting_stage, "cpu_ms_per_frame": result.cpu_ms_per_frame,
                   "cpu_utilisation": result.cpu_utilisation,
                   "latency_ms": result.latency_ms, "load_average_before": load_before,
                   "load_average_after": os.getloadavg(), "error": result.error}
            report["rows"][name] = row
            logger.info(f"video {name}: {row['fps']:.1f} fps end to end, limited by {row['limiting_stage']}")
    return report


def measure_run_video(backends: dict[str, Backend], cfg: Config, test_set, frames: int, threshold: float) -> dict:
    """:func:`measure_video` on a 720p clip made from the first test images of a run (``test_set.samples``)."""
    images = [read_image(sample.image) for sample in test_set.samples[:CLIP_IMAGES]]
    return measure_video(backends, cfg, images, frames, threshold)


def video_markdown(video: dict) -> list[str]:
    """The video section of the benchmark report, as Markdown lines."""
    clip = video["clip"]
    lines = ["", "## Video, end to end (decode -> segment -> overlay encode)", "",
             f"{clip['frames']} frames of {clip['width']}x{clip['height']} {clip['codec']} at {clip['fps']} fps, made "
             f"from {clip['images']} test images; batch 1; the decode and encode threads run beside the model "
             "(PyTorch on one core fewer than the machine has, leaving one to them). "
             "Stage times are ms per frame; a stage's time includes waiting for a core when every core is busy. "
             "CPU ms: all threads' CPU time per frame; CPU busy: CPU time over wall time and cores.", "",
             "| backend | fps | x 25 fps | x 30 fps | " + " | ".join(STAGES) + " | limited by | CPU ms | CPU busy | load avg |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in STAGES) + " | --- | ---: | ---: | ---: |"]
    for name, row in video["rows"].items():
        ms = row["ms_per_frame"]
        lines.append(f"| {name} | {row['fps']:.1f} | {row['real_time_factor_25']:.2f} | {row['real_time_factor_30']:.2f} | "
                     + " | ".join(f"{ms[s]:.1f}" for s in STAGES)
                     + f" | {row['limiting_stage']} | {row['cpu_ms_per_frame']:.0f} | {row['cpu_utilisation']:.0%} "
                     f"| {row['load_average_before'][0]:.2f} |")
    return lines
