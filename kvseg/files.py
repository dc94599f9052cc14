"""Writing files whole or not at all: every file kvseg writes goes through :func:`replacing`.

The content is written to a temporary file beside the target (``NAME.tmp``), flushed to disk
(``fsync``), then renamed over the target (``os.replace``, atomic on POSIX and Windows within one
file system). A crash, a kill or a full disk therefore leaves either the previous file or the new
one, never half of one; a write that fails removes its temporary file and raises
:class:`WriteError`, naming the file, with the previous file intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from kvseg.errors import KvsegError


class WriteError(KvsegError):
    """A file could not be written (disk full, no permission, I/O error); the previous file at its path is intact."""


def temporary_path(path: Path) -> Path:
    """Where :func:`replacing` writes before the rename: ``NAME.tmp`` beside ``path``."""
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; rename it over ``path`` when the block ends.

    For writers that need a file name (``onnx.save``, ``Figure.savefig``). The
    temporary file is removed when the block raises.

    Raises:
        WriteError: the write, the flush or the rename failed with an ``OSError`` (``ENOSPC``, ``EIO``,
            ``EACCES``, ...); ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        kept = "the previous file is kept" if path.is_file() else "nothing was written"
        raise WriteError(f"{path}: cannot write ({exc.strerror or exc}); {kept}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`replacing`)."""
    write_bytes(path, text.encode("utf-8"))


def sync(*paths: str | Path) -> None:
    """Flush each of ``paths`` (files or folders: a folder's entries, e.g. after a rename) to disk (``fsync``).

    Raises:
        WriteError: a flush failed, naming the path.
    """
    for path in paths:
        try:
            handle = os.open(path, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
        except OSError as exc:
            raise WriteError(f"{path}: cannot flush to disk ({exc.strerror or exc})") from None


def sync_tree(folder: str | Path) -> None:
    """:func:`sync` every file and folder under ``folder``, and ``folder`` itself, files before their folders.

    For a folder another library wrote file by file (accelerate's ``save_state``) before it is renamed
    into place: some file systems (NFS; any with delayed allocation when the disk is full) report a
    failed write only at the flush.
    """
    sync(*sorted(Path(folder).rglob("*"), reverse=True), folder)


def replace_folder(new: str | Path, target: str | Path) -> None:
    """Put the folder ``new`` in the place of ``target``: flushed to disk (:func:`sync_tree`), then renamed.

    The previous ``target`` is renamed to ``TARGET.old`` first and removed last, so a crash between
    the two renames leaves it whole under that name (readers fall back to it).

    Raises:
        WriteError: a flush failed; ``target`` is untouched.
        OSError: a rename failed.
    """
    new, target = Path(new), Path(target)
    old = target.with_name(target.name + ".old")
    sync_tree(new)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    sync(target.parent)  # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing_folder(folder: str | Path, what: str, kept: str, remove: bool = True) -> Iterator[None]:
    """Turn any failure inside the block, which writes ``what`` into ``folder``, into one :class:`WriteError`.

    For folders written by other libraries, whose errors for a full disk vary (``torch.save`` raises
    ``RuntimeError``, safetensors its own error, the file system ``OSError``). ``folder`` is removed
    when ``remove``; the message ends with ``kept``, what the caller keeps instead.

    Raises:
        WriteError: ``{folder}: cannot save {what} ({reason}; N MiB free there); {kept}``.
    """
    folder = Path(folder)
    try:
        yield
    except Exception as exc:
        if remove:
            shutil.rmtree(folder, ignore_errors=True)
        lines = str(exc).strip().splitlines()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (lines[-1][:200] if lines else type(exc).__name__)
        with contextlib.suppress(OSError):
            reason += f"; {shutil.disk_usage(folder.parent).free / 2**20:.1f} MiB free there"
        raise WriteError(f"{folder}: cannot save {what} ({reason}); {kept}") from None


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Encode ``image`` (uint8 (H, W) grey or (H, W, 3) BGR, as OpenCV takes it) as PNG and write it atomically.

    Raises:
        WriteError: OpenCV cannot encode the array, or the write fails (see :func:`replacing`).
    """
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise WriteError(f"{path}: could not encode PNG from an array of shape {image.shape} {image.dtype}")
    write_bytes(path, encoded.tobytes())


def write_json(path: str | Path, payload: object) -> None:
    """Write ``payload`` as indented JSON atomically; NaN and infinities must be made None first (:func:`json_safe`).

    Raises:
        TypeError: ``payload`` holds something JSON cannot represent.
        ValueError: it holds NaN or an infinity.
        WriteError: see :func:`replacing`.
    """
    write_text(path, json.dumps(payload, indent=2, allow_nan=False, default=_json_default))


def _json_default(value: object) -> object:
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def json_safe(value: object) -> object:
    """``value`` with every NaN and infinity (at any depth of dicts and lists) replaced by None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
