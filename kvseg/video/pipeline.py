"""The machinery of video segmentation: three threads joined by short bounded queues.

The reader decodes, the main thread prepares, infers and post-processes batches, the writer
encodes. Each queue holds a few frames (:data:`QUEUE_FRAMES`), so memory does not grow with the
length of the video, and the slowest stage sets the pace. :func:`kvseg.video.segment.segment_video` drives it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from kvseg.files import write_png
from kvseg.runtime import usable_cores
from kvseg.video.io import VideoInfo, VideoSource, VideoWriter

logger = logging.getLogger(__name__)

STAGES = ("decode", "preprocess", "inference", "postprocess", "encode")
THREADS = {"decode": ("decode",), "model": ("preprocess", "inference", "postprocess"), "encode": ("encode",)}
QUEUE_FRAMES = 4  # frames waiting between two threads, besides a batch
_END = object()


@dataclass
class VideoOptions:
    """How videos are segmented; the command line's video flags (:func:`add_video_arguments`)."""

    batch_size: int = 1  # frames per model call: 1 for the lowest latency
    smooth: float = 0.0  # weight of the past in an exponential moving average of the probabilities; 0 = off
    tta: bool = False
    save_masks: bool = False
    caption: bool = False  # processing fps and latency in the overlay's corner
    max_frames: int | None = None  # stop after this many frames


@dataclass
class Decoded:
    index: int
    image: np.ndarray  # RGB uint8 (H, W, 3)
    arrived: float  # perf_counter when decoding finished


@dataclass
class Segmented:
    index: int
    overlay: np.ndarray
    mask: np.ndarray | None
    arrived: float
    pts: int


class Stopped(Exception):
    """The pipeline is stopping; a blocked put gives up."""


def put(q: queue.Queue, item: object, stop: threading.Event) -> None:
    """``q.put(item)``, giving up with :class:`Stopped` once ``stop`` is set (the consumer may be gone)."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                raise Stopped from None


def put_dropping_oldest(q: queue.Queue, item: object) -> int:
    """Put without waiting, dropping the oldest waiting frame when full; returns the frames dropped."""
    dropped = 0
    while True:
        try:
            q.put_nowait(item)
            return dropped
        except queue.Full:
            with contextlib.suppress(queue.Empty):
                q.get_nowait()
                dropped += 1


@contextlib.contextmanager
def torch_leaves_a_core() -> Iterator[None]:
    """While inside, PyTorch's CPU threads number one fewer than the usable cores (at least one).

    The decode and encode threads need a core; with all of them given to PyTorch's OpenMP threads,
    those spun against the other two and inference took 6-7 times longer (README, "Segmenting video").
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(previous, usable_cores() - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """While inside, the first Ctrl-C sets ``event`` instead of raising; a second one interrupts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: object) -> None:
        event.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Pipeline:
    """The reader and writer threads around the main thread's model loop, and what they measured."""

    def __init__(self, source: VideoSource, writer: VideoWriter, masks_dir: Path | None, options: VideoOptions) -> None:
        self.source, self.writer, self.masks_dir, self.options = source, writer, masks_dir, options
        self.frames = queue.Queue(maxsize=QUEUE_FRAMES + options.batch_size)
        self.segmented = queue.Queue(maxsize=QUEUE_FRAMES)
        self.stop = threading.Event()  # stop reading: the end, Ctrl-C, an error, max_frames
        self.interrupted = threading.Event()
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.dropped = 0
        self.latencies: list[float] = []
        self.written = 0
        self.write_error: BaseException | None = None
        self.started = time.perf_counter()
        self.reader = threading.Thread(target=self._read, name="kvseg-decode", daemon=True)
        self.encoder = threading.Thread(target=self._write, name="kvseg-encode", daemon=True)

    def _read(self) -> None:
        live = self.source.info.live
        limit = self.options.max_frames
        item: object = _END
        try:
            start = time.perf_counter()
            for index, image in enumerate(self.source):
                arrived = time.perf_counter()
                self.seconds["decode"] += arrived - start
                decoded = Decoded(index, image, arrived)
                if live:
                    self.dropped += put_dropping_oldest(self.frames, decoded)
                else:
                    put(self.frames, decoded, self.stop)
                if self.stop.is_set() or self.interrupted.is_set() or (limit is not None and index + 1 >= limit):
                    break
                start = time.perf_counter()
        except Stopped:
            return
        except Exception as exc:  # VideoError, or a bug: the main thread reports it
            item = exc
        with contextlib.suppress(Stopped):
            put(self.frames, item, self.stop)

    def _write(self) -> None:
        try:
            while (item := self.segmented.get()) is not _END:
                start = time.perf_counter()
                self.writer.write(item.overlay, item.pts)
                if item.mask is not None:
                    write_png(self.masks_dir / f"frame_{item.index:06d}.png", item.mask.astype(np.uint8) * 255)
                done = time.perf_counter()
                self.seconds["encode"] += done - start
                self.latencies.append(1e3 * (done - item.arrived))
                self.written += 1
        except BaseException as exc:  # a full disk: stop reading, report it
            self.write_error = exc
            self.stop.set()
            while self.segmented.get() is not _END:
                pass
        finally:
            try:
                self.writer.close()
            except Exception as exc:
                self.write_error = self.write_error or exc

    def batches(self) -> Iterator[list[Decoded]]:
        """Batches of decoded frames until the source ends; raises what the reader raised."""
        batch: list[Decoded] = []
        while True:
            item = self.frames.get()
            if isinstance(item, Decoded):
                batch.append(item)
                if len(batch) == self.options.batch_size:
                    yield batch
                    batch = []
                continue
            if batch:
                yield batch
            if isinstance(item, BaseException):
                raise item
            return

    def emit(self, segmented: Segmented) -> None:
        put(self.segmented, segmented, self.stop)

    def finish(self) -> None:
        """Stop reading, let the writer drain and close the file."""
        self.stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.frames.get_nowait()  # unblock the reader
        self.reader.join()
        while self.encoder.is_alive():
            with contextlib.suppress(queue.Full):
                self.segmented.put(_END, timeout=0.1)
                break
        self.encoder.join()


class Flicker:
    """Mean fraction of pixels that change between consecutive masks."""

    def __init__(self) -> None:
        self.previous: np.ndarray | None = None
        self.total, self.count = 0.0, 0

    def add(self, mask: np.ndarray) -> None:
        if self.previous is not None:
            self.total += float(np.mean(mask != self.previous))
            self.count += 1
        self.previous = mask

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None


class Smoother:
    """Exponential moving average of probability maps, ``weight`` on the past (0: off), and the flicker
    of the thresholded maps before and after it."""

    def __init__(self, weight: float, threshold: float) -> None:
        self.weight, self.threshold = weight, threshold
        self.average: np.ndarray | None = None
        self.raw, self.smoothed = Flicker(), Flicker()

    def __call__(self, probability: np.ndarray) -> np.ndarray:
        self.raw.add(probability > self.threshold)
        if not self.weight:
            return probability
        if self.average is None:
            self.average = probability
        else:
            self.average = self.weight * self.average + (1 - self.weight) * probability
        self.smoothed.add(self.average > self.threshold)
        return self.average


class Meter:
    """Frames per second over the current second; one log line a second."""

    def __init__(self, info: VideoInfo, seconds: dict[str, float], enabled: bool = True) -> None:
        self.info, self.seconds, self.enabled = info, seconds, enabled
        self.since, self.frames_then, self.frames = time.perf_counter(), 0, 0

    def fps(self, now: float) -> float:
        return (self.frames - self.frames_then) / max(now - self.since, 1e-6)

    def count(self) -> None:
        self.frames += 1
        now = time.perf_counter()
        if self.enabled and now - self.since >= 1.0:
            ms = {stage: 1e3 * self.seconds[stage] / self.frames for stage in STAGES}
            of = f"/{self.info.frames}" if self.info.frames else ""
            logger.info(f"{self.info.name}: frame {self.frames}{of}, {self.fps(now):.1f} fps; ms/frame "
                     + ", ".join(f"{stage} {ms[stage]:.1f}" for stage in STAGES))
            self.since, self.frames_then = now, self.frames


def caption(image: np.ndarray, text: str) -> None:
    """White text on a dark box in the top-left corner, scaled to the frame height."""
    scale = max(0.35, image.shape[0] / 1200)
    thickness = max(1, round(2 * scale))
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    margin = max(2, round(6 * scale))
    cv2.rectangle(image, (0, 0), (width + 2 * margin, height + baseline + 2 * margin), (0, 0, 0), cv2.FILLED)
    cv2.putText(image, text, (margin, height + margin), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)
