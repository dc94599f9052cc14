"""Segmenting video: a recorded procedure, a camera or a stream, frame by frame in bounded memory.

    python -m kvseg.predict --onnx RUN/model_int8.onnx procedure.mp4 --out out/ [--save-masks] [--smooth 0.5]
    python -m kvseg.predict --run RUN 0 --out out/                 # camera 0, until Ctrl-C

For ``procedure.mp4`` it writes ``out/procedure_overlay.mp4`` (same size, rate and frame count,
instrument pixels tinted), ``out/procedure.json`` (:class:`VideoResult`) and, with ``--save-masks``,
``out/procedure_masks/frame_000000.png`` ... (0/255, at the video's size).

Three threads joined by short bounded queues: the reader decodes, the main thread prepares, infers
and post-processes batches, the writer encodes. Each queue holds a few frames, so memory does not
grow with the length of the video, and the slowest stage sets the pace. Every frame goes through
:meth:`kvseg.deploy.predict.Predictor.prepare` and :meth:`~kvseg.deploy.predict.Predictor.mask_at`, as still
images do, so a frame gives the mask that ``predict`` gives for the same picture. A live source
(camera, stream without a length) that outruns the model has its oldest waiting frame dropped, so the
overlay stays current; the overlay keeps the frames' arrival times. Ctrl-C ends a source cleanly:
queued frames are finished and the files closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvseg.evaluation.overlay import overlay
from kvseg.evaluation.tta import ALL_TRANSFORMS, with_tta
from kvseg.files import write_json
from kvseg.runtime import usable_cores
from kvseg.video.io import (
    VideoError,
    VideoSource,
    VideoWriter,
    is_video_input,
    open_source,
    output_stem,
)
from kvseg.video.pipeline import (
    STAGES,
    THREADS,
    Meter,
    Pipeline,
    Segmented,
    Smoother,
    Stopped,
    VideoOptions,
    caption,
    ctrl_c_sets,
    torch_leaves_a_core,
)

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from kvseg.deploy.predict import Predictor

@dataclass
class VideoResult:
    """One segmented video, as ``<stem>.json`` holds it.

    Stage times are the seconds each stage was busy, summed over frames; decode and encode run in
    threads of their own, the model stages in the main thread, so the stages overlap and the
    processed fps is set by the busiest thread. With fewer cores than busy threads, a stage's time
    includes waiting for a core (``cpu_utilisation`` near 1 says so). Flicker is the mean fraction
    of mask pixels that change between consecutive frames, at the model's resolution, before and
    after smoothing.
    """

    source: str
    live: bool
    width: int
    height: int
    source_fps: float
    declared_frames: int | None
    frames: int  # segmented and written
    dropped: int  # live frames skipped because the model was behind
    wall_s: float
    cpu_s: float
    stage_s: dict[str, float]
    latency_ms: dict[str, float]  # decoded -> encoded, waits in the queues included: median, p90, max
    flicker: float | None
    flicker_smoothed: float | None
    instrument_fraction: list[float]
    stopped: str  # "end", "ctrl-c", "max-frames" or "error"
    error: str | None
    overlay: str
    masks: str | None
    options: dict = field(default_factory=dict)

    @property
    def processed_fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    def ms_per_frame(self) -> dict[str, float]:
        """Milliseconds per frame of each stage."""
        return {stage: 1e3 * seconds / max(1, self.frames) for stage, seconds in self.stage_s.items()}

    def thread_ms_per_frame(self) -> dict[str, float]:
        """Milliseconds per frame of each thread: decode, model (preprocess + inference + postprocess), encode."""
        ms = self.ms_per_frame()
        return {thread: sum(ms[stage] for stage in stages) for thread, stages in THREADS.items()}

    @property
    def limiting_stage(self) -> str:
        """The busiest thread, which sets the pace: ``decode``, ``encode``, or the largest model stage.

        For a live source the decode thread's time includes waiting for the next frame: when it is
        the busiest, the pace is the source's own (``source``).
        """
        threads = self.thread_ms_per_frame()
        busiest = max(threads, key=threads.get)
        if busiest == "decode" and self.live:
            return "source"
        if busiest != "model":
            return busiest
        ms = self.ms_per_frame()
        return max(THREADS["model"], key=ms.get)

    @property
    def cpu_ms_per_frame(self) -> float:
        """CPU milliseconds per frame, all threads together: the work a frame costs, whatever the load."""
        return 1e3 * self.cpu_s / max(1, self.frames)

    @property
    def cpu_utilisation(self) -> float:
        """CPU seconds over wall seconds times usable cores: near 1, every core was busy."""
        return self.cpu_s / (self.wall_s * usable_cores()) if self.wall_s > 0 else 0.0

    def to_json(self) -> dict:
        values = asdict(self)
        values["instrument_fraction"] = [round(f, 6) for f in self.instrument_fraction]
        values.update(processed_fps=self.processed_fps, ms_per_frame=self.ms_per_frame(),
                      thread_ms_per_frame=self.thread_ms_per_frame(), limiting_stage=self.limiting_stage,
                      cpu_ms_per_frame=self.cpu_ms_per_frame, cpu_utilisation=self.cpu_utilisation)
        return values

    def line(self) -> str:
        """One summary line: frames, fps, per-stage ms, flicker."""
        ms = self.ms_per_frame()
        flicker = f", flicker {self.flicker:.4f}" if self.flicker is not None else ""
        if self.flicker_smoothed is not None:
            flicker += f" -> {self.flicker_smoothed:.4f} smoothed"
        dropped = f" ({self.dropped} dropped)" if self.dropped else ""
        return (f"{self.source}: {self.frames} frames{dropped} in {self.wall_s:.1f} s, {self.processed_fps:.1f} fps "
                f"(source {self.source_fps:.2f} fps); ms/frame " + ", ".join(f"{s} {ms[s]:.1f}" for s in STAGES)
                + f"; limited by {self.limiting_stage}{flicker}")


def segment_video(
    predictor: Predictor,
    source: VideoSource,
    overlay_path: Path,
    masks_dir: Path | None = None,
    options: VideoOptions | None = None,
    progress: bool = True,
) -> VideoResult:
    """Segment every frame of ``source``; write the overlay video (and masks) as they come.

    With ``progress``, logs one line a second (frames, fps, ms per stage). PyTorch leaves a core to decoding and
    encoding meanwhile (:func:`torch_leaves_a_core`). A decoding error of the source ends the
    video there: the frames before it are finished and the overlay closed, playable, and the result
    has ``stopped == "error"`` and the one-line message. Ctrl-C ends it the same way (``"ctrl-c"``).

    Raises:
        VideoError: the overlay or a mask cannot be written.
    """
    options = options or VideoOptions()
    info = source.info
    if masks_dir is not None:
        masks_dir.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(source, VideoWriter(overlay_path, info.width, info.height, info.fps), masks_dir, options)
    logits_fn = with_tta(predictor.logits, ALL_TRANSFORMS) if options.tta else predictor.logits
    smoother = Smoother(options.smooth, predictor.threshold)
    seconds = pipeline.seconds
    meter = Meter(info, seconds, progress)
    fractions: list[float] = []
    first_arrival: float | None = None
    stopped, error = "end", None
    cpu_start = time.process_time()  # all threads of the process
    with ctrl_c_sets(pipeline.interrupted), torch_leaves_a_core():
        pipeline.reader.start()
        pipeline.encoder.start()
        try:
            for batch in pipeline.batches():
                start = time.perf_counter()
                prepared = torch.stack([predictor.prepare(frame.image) for frame in batch])  # (B, 3, S, S)
                prepared_at = time.perf_counter()
                probabilities = torch.sigmoid(logits_fn(prepared).float())[:, 0].numpy()  # (B, S, S)
                inferred_at = time.perf_counter()
                seconds["preprocess"] += prepared_at - start
                seconds["inference"] += inferred_at - prepared_at
                for frame, probability in zip(batch, probabilities):
                    begin = time.perf_counter()
                    height, width = frame.image.shape[:2]
                    mask = predictor.mask_at(smoother(probability), height, width)  # (H, W) bool
                    fractions.append(float(mask.mean()))
                    tinted = overlay(frame.image, None, mask)
                    if options.caption:
                        now = time.perf_counter()
                        caption(tinted, f"kvseg {meter.fps(now):.1f} fps, {1e3 * (now - frame.arrived):.0f} ms")
                    first_arrival = frame.arrived if first_arrival is None else first_arrival
                    pts = round((frame.arrived - first_arrival) * info.fps) if info.live else frame.index
                    seconds["postprocess"] += time.perf_counter() - begin
                    pipeline.emit(Segmented(frame.index, tinted, mask if masks_dir else None, frame.arrived, pts))
                    meter.count()
                if pipeline.write_error is not None:
                    break
        except VideoError as exc:
            stopped, error = "error", str(exc)
        except Stopped:
            pass
        finally:
            pipeline.finish()
            source.close()
    wall = time.perf_counter() - pipeline.started
    if pipeline.write_error is not None:
        raise pipeline.write_error if isinstance(pipeline.write_error, VideoError) else VideoError(
            f"{overlay_path}: cannot write ({pipeline.write_error})")
    if stopped == "end" and pipeline.interrupted.is_set():
        stopped = "ctrl-c"
    elif stopped == "end" and options.max_frames is not None and pipeline.written >= options.max_frames:
        stopped = "max-frames"
    latencies = np.array(pipeline.latencies or [0.0])
    return VideoResult(
        source=info.name, live=info.live, width=info.width, height=info.height, source_fps=float(info.fps),
        declared_frames=info.frames, frames=pipeline.written, dropped=pipeline.dropped, wall_s=wall,
        cpu_s=time.process_time() - cpu_start, stage_s=dict(seconds),
        latency_ms={"median": float(np.median(latencies)), "p90": float(np.percentile(latencies, 90)),
                    "max": float(latencies.max())},
        flicker=smoother.raw.value, flicker_smoothed=smoother.smoothed.value if options.smooth else None,
        instrument_fraction=fractions[:pipeline.written], stopped=stopped, error=error, overlay=str(overlay_path),
        masks=str(masks_dir) if masks_dir is not None else None, options=asdict(options),
    )


def split_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Video inputs (files with a video extension, camera numbers, URLs) and the rest (images, folders)."""
    videos = [text for text in inputs if is_video_input(text)]
    return videos, [text for text in inputs if not is_video_input(text)]


def predict_videos(
    predictor: Predictor, inputs: Sequence[str], out_dir: Path, options: VideoOptions, model: str,
) -> list[str]:
    """Segment each video input into ``out_dir``; returns the one-line problems (unreadable, truncated).

    Ctrl-C ends the current video cleanly and skips the remaining ones. It is how a live source
    ends; a file cut short by it is reported as a problem, naming the frame.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    used: set[str] = set()
    for text in inputs:
        try:
            source = open_source(text)
        except VideoError as exc:
            problems.append(str(exc))
            continue
        stem = output_stem(text)
        while stem in used:
            stem += "_"
        used.add(stem)
        masks_dir = out_dir / f"{stem}_masks" if options.save_masks else None
        result = segment_video(predictor, source, out_dir / f"{stem}_overlay.mp4", masks_dir, options)
        write_json(out_dir / f"{stem}.json", {"model": model, **result.to_json()})
        logger.info(result.line())
        if result.error:
            problems.append(f"{result.error}; the {result.frames} frames before it are in {result.overlay}")
        if result.stopped == "ctrl-c":
            logger.info(f"stopped by Ctrl-C after {result.frames} frames of {text}; its files are closed and playable")
            if not result.live:
                problems.append(f"{text}: frame {result.frames}: stopped by Ctrl-C; the {result.frames} frames before "
                                f"it are in {result.overlay}")
            break
    return problems
