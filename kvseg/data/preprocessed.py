"""The persistent on-disk cache of a dataset folder: decoded, resized frames in memory-mapped files.

Decoding a JPEG or PNG and resizing it costs more than augmenting it; nnU-Net preprocesses a dataset
once for that reason. kvseg does the same lazily: the first run (or benchmark, export, report) that
reads a folder at an image size writes every pair, decoded, resized and read through the dataset's
mask encoding, to ``CACHE_DIR/<folder>-<size>px-<key>/`` as two ``.npy`` files

* ``images.npy``: uint8 (N, S, S, 3), RGB;
* ``masks.npy``: uint8 (N, S, S), {0, 1};

with ``frames.json`` naming the ids in row order. Later runs open them with ``numpy.load(...,
mmap_mode="r")``: nothing is decoded again, and every DataLoader worker and every process on the
machine reads the same pages of the operating system's page cache.

The key is a SHA-256 of what the arrays depend on: the format version, the image size, the mask
encoding, and every file's resolved path, size in bytes, modification and status-change times (ns)
and inode (a file replaced by one of the same size with its old mtime put back still changes the
last two). Changing,
adding or removing a file, or reading the masks differently, makes a new entry; old entries are
left in place (delete ``CACHE_DIR`` to reclaim the space; its size is printed when an entry is
made). ``CACHE_DIR`` is ``data.cache_dir``, else ``$KVSEG_CACHE_DIR``, else
``$XDG_CACHE_HOME/kvseg`` (``~/.cache/kvseg``); it is never inside the data folder.

An entry is written to a temporary folder and renamed into place, so a run stopped while building
leaves nothing that a later run would read, and processes building the same entry at once do not
clash (the first rename wins). Where the entry cannot be written (no space, read-only home), the
caller falls back to decoding in the run and says so in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from kvseg.data.folder import Sample, read_image, resize_pair
from kvseg.data.masks import MaskEncoding, read_mask
from kvseg.errors import ConfigError, CorruptImageError
from kvseg.runtime import single_threaded_opencv, usable_cores

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGES, MASKS, INDEX = "images.npy", "masks.npy", "frames.json"


class CacheUnavailable(Exception):
    """The cache entry could not be written here (disk full, folder not writable); decode in the run instead."""


def default_cache_dir() -> Path:
    """``$KVSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvseg``, else ``~/.cache/kvseg``."""
    if os.environ.get("KVSEG_CACHE_DIR"):
        return Path(os.environ["KVSEG_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kvseg"


def resolve_cache_dir(configured: str, data_root: str | Path) -> Path:
    """The cache folder to use: ``configured`` (``data.cache_dir``) or :func:`default_cache_dir`.

    Raises:
        ConfigError: the folder is the data folder or inside it (the cache never writes there); the
            message names where the folder came from (the config key or the environment variable).
    """
    folder = Path(configured).expanduser() if configured else default_cache_dir()
    source = ("config key 'data.cache_dir'" if configured else "$KVSEG_CACHE_DIR" if os.environ.get("KVSEG_CACHE_DIR")
              else "the default cache folder ($XDG_CACHE_HOME/kvseg or ~/.cache/kvseg)")
    root = Path(data_root).resolve()
    if folder.resolve() == root or root in folder.resolve().parents:
        raise ConfigError(f"{source} is {folder}, inside the data folder {root}; expected a folder outside it "
                          "(kvseg never writes into the data folder)")
    return folder


def file_fingerprint(path: str | Path) -> list:
    """A file's resolved path, size, mtime, ctime (ns) and inode: what changes when it is edited, replaced or copied over."""
    stat = Path(path).stat()  # ctime and inode too: a copy that keeps size and mtime (cp -p) changes them
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def fingerprints(samples: Sequence[Sample]) -> list[list]:
    """Per sample, by id: the id and the :func:`file_fingerprint` of its image and its mask."""
    return [[s.id, *file_fingerprint(s.image), *file_fingerprint(s.mask)] for s in sorted(samples, key=lambda s: s.id)]


def cache_key(samples: Sequence[Sample], image_size: int, encoding: MaskEncoding) -> str:
    """SHA-256 (hex) of the format, size, encoding and each file's resolved path, size, mtime, ctime (ns) and inode."""
    described = {"format": FORMAT_VERSION, "image_size": image_size, "encoding": asdict(encoding),
                 "files": fingerprints(samples)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def decode_pair(sample: Sample, image_size: int, encoding: MaskEncoding) -> tuple[np.ndarray, np.ndarray]:
    """The resized uint8 image (S, S, 3) and {0, 1} mask (S, S) of ``sample``.

    Raises:
        CorruptImageError: image and mask differ in size (or either cannot be decoded).
    """
    image = read_image(sample.image)
    mask = read_mask(sample.mask, encoding)
    if image.shape[:2] != mask.shape[:2]:
        raise CorruptImageError(
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{image.shape[1]}x{image.shape[0]}; expected the same size"
        )
    return resize_pair(image, mask, image_size)


class PreprocessedFrames:
    """One cache entry, opened read-only: :meth:`pair` returns a sample's decoded, resized arrays.

    The memory maps are opened on first use in each process and are not pickled, so DataLoader
    workers started by ``spawn`` reopen the files instead of receiving copies of the arrays.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX).read_text())
        self.image_size: int = index["image_size"]
        self.rows: dict[str, int] = {sample_id: row for row, sample_id in enumerate(index["ids"])}
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.rows

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (np.load(self.folder / IMAGES, mmap_mode="r"), np.load(self.folder / MASKS, mmap_mode="r"))
        return self._arrays

    def pair(self, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Writable copies of the uint8 image (S, S, 3) and {0, 1} mask (S, S) of ``sample_id``."""
        images, masks = self._open()
        row = self.rows[sample_id]
        return np.array(images[row]), np.array(masks[row])

    @property
    def nbytes(self) -> int:
        return sum((self.folder / name).stat().st_size for name in (IMAGES, MASKS, INDEX))


def _write_entry(folder: Path, samples: Sequence[Sample], image_size: int, encoding: MaskEncoding) -> None:
    """Decode every sample into ``folder`` (which exists and is empty), several files at a time.

    Decoding (Pillow) and resizing (OpenCV) release the GIL, so threads use every core; OpenCV's
    own pool is turned off first, as DataLoader workers forked later need. Rows are written with
    plain file writes, not through a memory map: a full disk is then an OSError, not a SIGBUS.
    """
    single_threaded_opencv()
    n, s = len(samples), image_size
    with (folder / IMAGES).open("wb") as images, (folder / MASKS).open("wb") as masks, \
            ThreadPoolExecutor(max_workers=usable_cores()) as pool:
        np.lib.format.write_array_header_1_0(images, {"descr": "|u1", "fortran_order": False, "shape": (n, s, s, 3)})
        np.lib.format.write_array_header_1_0(masks, {"descr": "|u1", "fortran_order": False, "shape": (n, s, s)})
        for image, mask in pool.map(lambda sample: decode_pair(sample, image_size, encoding), samples):
            images.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
            masks.write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    index = {"format": FORMAT_VERSION, "image_size": image_size, "encoding": asdict(encoding),
             "ids": [sample.id for sample in samples], "data_root": str(Path(samples[0].image).resolve().parents[1])}
    (folder / INDEX).write_text(json.dumps(index, indent=1))


def _remove_abandoned_builds(cache_dir: Path) -> None:
    """Remove ``.building-*`` folders of this machine whose process is gone (a run killed while decoding)."""
    host = socket.gethostname()
    for folder in cache_dir.glob(f".building-{host}-*"):
        pid = folder.name.removeprefix(f".building-{host}-").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def entry_damage(folder: Path, ids: Sequence[str], image_size: int) -> str | None:
    """What is wrong with the finished entry ``folder`` for ``ids`` at ``image_size``, or None when it is whole.

    Checks what a hand edit or a broken disk would change: the index, the ids in their rows, the
    arrays' shapes, dtype and file lengths (not every pixel).
    """
    try:
        index = json.loads((folder / INDEX).read_text())
        if index.get("format") != FORMAT_VERSION or index.get("image_size") != image_size:
            return f"{INDEX} is of another format or size"
        if index.get("ids") != list(ids):
            return f"{INDEX} does not list the folder's ids"
        images, masks = np.load(folder / IMAGES, mmap_mode="r"), np.load(folder / MASKS, mmap_mode="r")
    except (OSError, ValueError, AttributeError, EOFError) as exc:  # JSONDecodeError is a ValueError
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'}"
    n, s = len(ids), image_size
    if images.shape != (n, s, s, 3) or masks.shape != (n, s, s) or images.dtype != np.uint8 or masks.dtype != np.uint8:
        return f"arrays are {images.shape} {images.dtype} and {masks.shape} {masks.dtype}, expected ({n}, {s}, {s}, 3) uint8"
    return None


def entry_folder(samples: Sequence[Sample], image_size: int, encoding: MaskEncoding, cache_dir: str | Path) -> Path:
    """Where the entry of ``samples`` at ``image_size`` read through ``encoding`` lives: ``CACHE_DIR/<folder>-<size>px-<key>``."""
    root_name = Path(samples[0].image).resolve().parents[1].name or "data"
    return Path(cache_dir) / f"{root_name}-{image_size}px-{cache_key(samples, image_size, encoding)[:16]}"


def open_or_build(samples: Sequence[Sample], image_size: int, encoding: MaskEncoding, cache_dir: str | Path,
                  quiet: bool = False, build: bool = True) -> PreprocessedFrames:
    """The cache entry of ``samples`` at ``image_size`` under ``cache_dir``, written first if missing (and ``build``).

    An entry that exists but is damaged (:func:`entry_damage`) is said so in one line, removed and
    written again. A new entry is announced in one line with its size, unless ``quiet``.

    Raises:
        CacheUnavailable: the entry is missing and cannot be written there (the message says why), or
            is missing and ``build`` is false.
        CorruptImageError, ImageTooLargeError: a file cannot be read (nothing is left behind).
    """
    samples = sorted(samples, key=lambda s: s.id)
    cache_dir = Path(cache_dir)
    entry = entry_folder(samples, image_size, encoding, cache_dir)
    if (entry / INDEX).is_file():
        damage = entry_damage(entry, [sample.id for sample in samples], image_size)
        if damage is None:
            return PreprocessedFrames(entry)
        if not build:
            raise CacheUnavailable(f"cache entry {entry} is damaged ({damage})")
        logger.info(f"note: cache entry {entry} is damaged ({damage}); decoding the folder again")
        shutil.rmtree(entry, ignore_errors=True)
    if not build:
        raise CacheUnavailable(f"cache entry {entry} was not written by this machine's first process")
    needed = len(samples) * image_size * image_size * 4
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache_dir).free
        if free < 2 * needed:
            raise CacheUnavailable(f"{cache_dir} has {free / 2**20:.0f} MiB free; kvseg asks for twice the entry's "
                                   f"{needed / 2**20:.0f} MiB")
        _remove_abandoned_builds(cache_dir)
        building = Path(tempfile.mkdtemp(prefix=f".building-{socket.gethostname()}-{os.getpid()}-{entry.name}-",
                                         dir=cache_dir))
    except OSError as exc:
        raise CacheUnavailable(f"{cache_dir}: cannot write there ({exc.strerror or exc})") from None
    start = time.perf_counter()
    try:
        _write_entry(building, samples, image_size, encoding)
        try:
            building.rename(entry)
        except OSError:
            if not (entry / INDEX).is_file():  # not another process that finished first
                raise
    except OSError as exc:
        raise CacheUnavailable(f"{cache_dir}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    frames = PreprocessedFrames(entry)
    if not quiet:
        logger.info(f"Cache: decoded {len(samples)} pairs at {image_size} px in {time.perf_counter() - start:.1f} s into "
                    f"{entry} ({frames.nbytes / 2**20:.0f} MiB); later runs on this folder read them instead of decoding")
    return frames
