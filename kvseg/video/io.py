"""Reading and writing video: PyAV (FFmpeg) for files, stream URLs and the output, OpenCV for cameras.

Why PyAV for files and output (measured with the wheels kvseg installs, see the README's "Video"):
PyAV's FFmpeg has an H.264 encoder (libx264), so the overlay is an MP4 that browsers and every
player open, and it can write that MP4 fragmented, so a crash or a kill keeps everything up to the
last one-second fragment playable; its decoder raises at the frame where a truncated file breaks
and gives each frame's timestamp. OpenCV's wheel writes no H.264 (``avc1`` fails; ``mp4v`` works but
browsers do not play it), cannot fragment an MP4 (one killed while writing does not open), and ends
a truncated file silently. A camera *number*, on the other hand, is what ``cv2.VideoCapture`` opens
on every system (V4L2, AVFoundation, DirectShow), so cameras go through OpenCV.

Frames are RGB uint8 (H, W, 3) throughout, as :func:`kvseg.data.folder.read_image` gives still images.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import av
import av.error
import cv2
import numpy as np

from kvseg.errors import KvsegError

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                    ".wmv", ".flv", ".3gp", ".ogv")
FRAGMENTED_MP4 = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}  # playable up to the last keyframe after a crash
X264_OPTIONS = {"preset": "ultrafast", "crf": "23"}  # the least CPU per frame: the model needs the cores (README)
DEFAULT_FPS = Fraction(30)  # for a source that does not say
# OpenCV's log level: cv2.utils.logging in OpenCV 5, the top-level cv2.getLogLevel/setLogLevel in 4.x (the
# wheel pip picks next to numpy 1.x). 2 is cv::utils::logging::LOG_LEVEL_ERROR in both.
_CV2_LOGGING = getattr(cv2.utils, "logging", cv2)
_CV2_LOG_LEVEL_ERROR = 2


class VideoError(KvsegError):
    """A video cannot be opened, decoded or written; the message names the file and the frame."""


def is_video_input(text: str) -> bool:
    """Whether a command-line input is a video: a camera number, a URL, or a file with a video extension."""
    return text.isdigit() or "://" in text or Path(text).suffix.lower() in VIDEO_EXTENSIONS


def output_stem(text: str) -> str:
    """The name of a source's output files: the file's stem, ``camera0``, or a URL's last path part or host."""
    if text.isdigit():
        return f"camera{text}"
    if "://" in text:
        url = urlsplit(text)
        last = url.path.rstrip("/").rsplit("/", 1)[-1]
        name = last.rsplit(".", 1)[0] if "." in last else last
        return re.sub(r"[^\w.-]", "_", name or url.hostname or "") or "stream"
    return Path(text).stem


def _reason(exc: BaseException) -> str:
    """FFmpeg's own words (``strerror``), without the errno and the file name PyAV adds."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).splitlines()[0][:160]


@dataclass(frozen=True)
class VideoInfo:
    """What a source says about itself. ``frames``: the declared length, None for a live source or when unknown."""

    name: str  # as messages show it: the path or URL, or "camera 0"
    width: int
    height: int
    fps: Fraction
    frames: int | None
    live: bool


class VideoSource:
    """Frames of a video, decoded in order: iterate for RGB uint8 (H, W, 3) arrays; close when done.

    Iterating raises :class:`VideoError` naming the frame where the source broke.
    """

    info: VideoInfo

    def __iter__(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class FileSource(VideoSource):
    """A video file or a stream URL, decoded by FFmpeg with its own threads.

    A URL without a declared length (RTSP, a live HLS playlist) is live; a file never is.
    """

    def __init__(self, text: str) -> None:
        url = "://" in text
        if not url and not Path(text).is_file():
            raise VideoError(f"{text}: video file not found")
        try:
            self._container = av.open(text, timeout=10.0 if url else None)
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(f"{text}: cannot open video ({_reason(exc)}); expected a video file or stream that "
                             "FFmpeg reads") from None
        if not self._container.streams.video:
            self._container.close()
            raise VideoError(f"{text}: no video stream in this file")
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: a 720p H.264 decodes 1.5x faster on two cores
        fps = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
        frames = self._declared_frames(stream, Fraction(fps))
        self._stream = stream
        self.info = VideoInfo(text, stream.codec_context.width, stream.codec_context.height, Fraction(fps), frames,
                              live=url and frames is None)

    def _declared_frames(self, stream: av.video.stream.VideoStream, fps: Fraction) -> int | None:
        """The length the file states: its frame count (MP4, AVI), else its duration times the rate (MKV)."""
        if stream.frames:
            return int(stream.frames)
        if stream.duration and stream.time_base:
            return round(stream.duration * stream.time_base * fps)
        if self._container.duration:
            return round(Fraction(self._container.duration, av.time_base) * fps)
        return None

    def __iter__(self) -> Iterator[np.ndarray]:
        index = 0
        try:
            for frame in self._container.decode(self._stream):
                yield frame.to_ndarray(format="rgb24")
                index += 1
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.info.name}: frame {index}: cannot decode ({_reason(exc)}); "
                             "the video is truncated or damaged") from None
        declared = self.info.frames
        if declared and index < declared - 1:  # one frame of slack: durations round
            raise VideoError(f"{self.info.name}: frame {index}: the video ends here but declares {declared} frames; "
                             "it is truncated")

    def close(self) -> None:
        self._container.close()


class CameraSource(VideoSource):
    """A camera by number, through OpenCV: always live."""

    def __init__(self, index: int) -> None:
        level = _CV2_LOGGING.getLogLevel()
        _CV2_LOGGING.setLogLevel(_CV2_LOG_LEVEL_ERROR)  # its warnings would break the one-line error
        try:
            self._capture = cv2.VideoCapture(index)
            ok, first = self._capture.read() if self._capture.isOpened() else (False, None)
        finally:
            _CV2_LOGGING.setLogLevel(level)
        if not ok:
            self._capture.release()
            raise VideoError(f"camera {index}: cannot open (no camera with this number, or it is in use)")
        self._first = first
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        self.info = VideoInfo(f"camera {index}", first.shape[1], first.shape[0],
                              Fraction(fps).limit_denominator(1001) if fps > 0 else DEFAULT_FPS, None, live=True)

    def __iter__(self) -> Iterator[np.ndarray]:
        yield cv2.cvtColor(self._first, cv2.COLOR_BGR2RGB)
        index = 1
        while True:
            ok, frame = self._capture.read()
            if not ok:
                raise VideoError(f"{self.info.name}: frame {index}: the camera stopped sending frames")
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1

    def close(self) -> None:
        self._capture.release()


def open_source(text: str) -> VideoSource:
    """The source a command-line input names: a camera number, a stream URL or a video file.

    Raises:
        VideoError: it cannot be opened, naming it and FFmpeg's or OpenCV's reason.
    """
    return CameraSource(int(text)) if text.isdigit() else FileSource(text)


class VideoWriter:
    """An H.264 MP4 (MPEG-4 Part 2 where the FFmpeg build has no libx264), written fragmented.

    A keyframe, and so a fragment, every second: after a crash everything up to the last fragment
    plays. Odd frame sizes are written in 4:4:4 chroma, since 4:2:0 needs even sides.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: Fraction, x264: dict | None = None) -> None:
        """``x264``: libx264 options over :data:`X264_OPTIONS`, e.g. ``{"preset": "veryfast"}``."""
        self.path = Path(path)
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        try:
            self._container = av.open(str(self.path), "w", format="mp4", options=FRAGMENTED_MP4)
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.path}: cannot write video ({_reason(exc)})") from None
        self._stream = self._container.add_stream(codec, rate=fps)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        keyframes = str(max(1, round(fps)))
        if codec == "libx264":
            self._stream.options = {**X264_OPTIONS, "g": keyframes, **(x264 or {})}
        else:
            self._stream.options = {"g": keyframes, "qscale": "3"}
        self._pts = -1

    def write(self, image: np.ndarray, pts: int | None = None) -> None:
        """Append an RGB uint8 (H, W, 3) frame; ``pts`` in frames of the output rate (default: the next one)."""
        self._pts = max(self._pts + 1, pts if pts is not None else self._pts + 1)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = self._pts
        try:
            self._container.mux(self._stream.encode(frame))
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoError(f"{self.path}: frame {self._pts}: cannot write ({_reason(exc)})") from None

    def close(self) -> None:
        """Flush the encoder and finish the file; it plays in full afterwards."""
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()


