"""How a dataset's masks encode instrument and background: decided once, from all of its masks.

Reading each file on its own ("only 0 and 1: as is, else >= 128") reads a 0/1 JPEG with a few
compression values of 2 as empty, a label map {0, 1, 2} as empty and a palette mask whose index 1
is dark red as empty. Here every mask is first reduced to one value per pixel and summarised
(:class:`MaskValues`: its value histogram, whether its format is lossy); one
:class:`MaskEncoding` is then decided for the whole dataset (:func:`decide_encoding`) and every
mask is read through it (:func:`read_mask`). A mask whose values do not fit the encoding is
refused with its file and value set named — never guessed.

The encodings (``data.mask_encoding``; ``auto`` decides among the first three):

* ``binary-0-255``: 0 background, 255 instrument; values in between (JPEG edges, soft edges) are
  instrument from ``data.mask_threshold`` (128) on.
* ``binary-0-1``: 0 background, 1 instrument; JPEG noise values (2, 3, ...) are instrument too.
* ``labels``: a label map; 0 is background and every other value instrument, or only the values in
  ``data.foreground_values``.
* ``palette``: palette (mode P) masks, as labelme and VOC tools write them, read by their indices
  like a label map. A palette whose colours are all greys (what GIF writers make of a greyscale
  mask) is read by its grey levels instead, since its index order carries no meaning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kvseg.data.folder import open_image
from kvseg.errors import MaskEncodingError

ENCODINGS = ("binary-0-255", "binary-0-1", "labels", "palette")  # the choices of data.mask_encoding besides auto
LOSSY_FORMATS = {"JPEG", "MPO", "WEBP", "JPEG2000"}  # their decoded values are not the values that were saved
EXACT_MAX_VALUES = 32  # a lossless mask with at most this many distinct values holds exact classes
SMALL_NOISY_MAX = 15  # a lossy mask whose values all stay at or below this is a 0/1 mask with noise
EDGE_BAND = (32, 224)  # values of a noisy 0/255 mask in this band are edges ...
EDGE_BAND_MAX_FRACTION = 0.05  # ... and cover at most this fraction of its pixels (a photo covers far more)


@dataclass(frozen=True)
class MaskValues:
    """One mask file reduced to one value per pixel: its value histogram and what kind of mask that makes.

    ``source`` says how the values were taken: ``grey``, ``palette indices``, ``palette greys``,
    ``max of colour channels`` or ``16-bit`` / ``float``.
    """

    path: Path
    source: str
    format: str
    lossy: bool
    size: tuple[int, int]  # (width, height), upright
    values: np.ndarray  # distinct values, ascending (int64)
    counts: np.ndarray  # pixels per value

    @property
    def pixels(self) -> int:
        return int(self.counts.sum())

    @property
    def kind(self) -> str:
        """``empty``, ``0/255``, ``0/1``, ``labels`` (exact values), ``0/255 noisy``, ``0/1 noisy`` or ``unknown``."""
        top = int(self.values[-1])
        if top == 0:
            return "empty"
        if not self.lossy and len(self.values) <= EXACT_MAX_VALUES:
            present = set(self.values.tolist())
            return "0/255" if present <= {0, 255} else "0/1" if present <= {0, 1} else "labels"
        if top <= SMALL_NOISY_MAX:
            return "0/1 noisy"
        if top >= 128 and self.edge_fraction <= EDGE_BAND_MAX_FRACTION:
            return "0/255 noisy"
        return "unknown"

    @property
    def edge_fraction(self) -> float:
        """Fraction of pixels with values in :data:`EDGE_BAND` (edges of a noisy 0/255 mask)."""
        inside = (self.values >= EDGE_BAND[0]) & (self.values < EDGE_BAND[1])
        return float(self.counts[inside].sum() / max(self.pixels, 1))

    def value_set(self) -> str:
        """The values seen, e.g. ``{0, 255}`` or ``0-255 (183 values)``."""
        if len(self.values) <= 6:
            return "{" + ", ".join(str(v) for v in self.values.tolist()) + "}"
        return f"{self.values[0]}-{self.values[-1]} ({len(self.values)} values)"


def _palette_values(image: Image.Image) -> tuple[np.ndarray, str]:
    indices = np.array(image.getchannel(0) if image.mode == "PA" else image)
    palette = np.array(image.getpalette("RGB") or [], dtype=np.int64).reshape(-1, 3)
    used = np.flatnonzero(np.bincount(indices.ravel(), minlength=256))
    if len(palette) > used[-1] and np.all(palette[used] == palette[used][:, :1]):
        return palette[:, 0].astype(np.uint8)[indices], "palette greys"
    return indices, "palette indices"


def mask_array(image: Image.Image) -> tuple[np.ndarray, str]:
    """One value per pixel (H, W) of a mask image, and how it was taken (see :attr:`MaskValues.source`).

    Palette masks give their indices (or grey levels, for a palette of greys); colour masks the
    largest of their R, G, B values, so a pure red or green mask reads like a grey one.
    """
    mode = image.mode
    if mode in ("P", "PA"):
        return _palette_values(image)
    if mode == "L":
        return np.array(image), "grey"
    if mode in ("1", "LA", "La"):
        return np.array(image.convert("L")), "grey"
    if mode.startswith("I"):
        return np.array(image).astype(np.int64), "16-bit"
    if mode == "F":
        values = np.nan_to_num(np.array(image, dtype=np.float64))
        if values.max(initial=0) <= 1.0:  # probabilities or 0.0/1.0: on the 0-255 scale of 8-bit masks
            values = values * 255.0
        return np.rint(values).astype(np.int64), "float"
    rgb = np.array(image.convert("RGB"))
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]), "max of colour channels"


def _histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if values.dtype == np.uint8:
        counts = np.bincount(values.ravel(), minlength=256)
        present = np.flatnonzero(counts)
        return present.astype(np.int64), counts[present]
    distinct, counts = np.unique(values, return_counts=True)
    return distinct.astype(np.int64), counts


def open_mask(path: str | Path) -> tuple[np.ndarray, MaskValues]:
    """The values (H, W) of the mask at ``path``, upright, and their summary.

    Raises:
        CorruptImageError: the file cannot be decoded.
    """
    path = Path(path)
    image = open_image(path)
    array, source = mask_array(image)
    distinct, counts = _histogram(array)
    lossy = (image.format or "").upper() in LOSSY_FORMATS
    summary = MaskValues(path, source, image.format or "?", lossy, image.size, distinct, counts)
    return array, summary


def inspect_mask(path: str | Path) -> MaskValues:
    """The summary of one mask file (see :func:`open_mask`)."""
    return open_mask(path)[1]


def inspect_masks(paths: Sequence[str | Path], workers: int | None = None) -> list[MaskValues]:
    """:func:`inspect_mask` of every path, in order, decoded on a few threads (Pillow decodes without the GIL)."""
    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 8:
        return [inspect_mask(path) for path in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(inspect_mask, paths, chunksize=16))


@dataclass(frozen=True)
class MaskEncoding:
    """How mask values become instrument (1) and background (0); see the module docstring.

    ``threshold`` applies to ``binary-0-255``; ``foreground`` (empty: any non-zero value) to
    ``labels`` and ``palette``.
    """

    name: str
    threshold: int = 128
    foreground: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in ENCODINGS:
            raise ValueError(f"mask encoding {self.name!r}; expected one of {', '.join(ENCODINGS)}")

    def fits(self, mask: MaskValues) -> bool:
        """True when ``mask`` can be read by this encoding without guessing."""
        kind = mask.kind
        if kind == "empty":
            return True
        if self.name == "binary-0-255":
            return kind in ("0/255", "0/255 noisy")
        if self.name == "binary-0-1":
            return kind in ("0/1", "0/1 noisy")
        if self.name == "palette":
            return mask.source == "palette indices"
        return not mask.lossy  # labels: exact values, whatever they are

    def expected(self) -> str:
        """What a fitting mask holds, for error messages."""
        return {
            "binary-0-255": "values 0 and 255 (JPEG or soft edges in between allowed)",
            "binary-0-1": "values 0 and 1 (JPEG noise allowed)",
            "labels": "exact class values in a lossless file (PNG, TIFF, BMP, GIF; not JPEG)",
            "palette": "a palette (mode P) image with coloured entries",
        }[self.name]

    def instrument(self, values: np.ndarray) -> np.ndarray:
        """Boolean array: which of ``values`` (any shape) are instrument."""
        if self.name == "binary-0-255":
            return values >= self.threshold
        if self.name == "binary-0-1":
            return values >= 1
        return np.isin(values, self.foreground) if self.foreground else values != 0

    def fraction(self, mask: MaskValues) -> float:
        """Fraction of ``mask``'s pixels that are instrument."""
        return float(mask.counts[self.instrument(mask.values)].sum() / max(mask.pixels, 1))

    @property
    def title(self) -> str:
        return {"binary-0-255": "binary 0/255", "binary-0-1": "binary 0/1", "labels": "label map",
                "palette": "palette indices"}[self.name]

    def rule(self) -> str:
        """Which values are instrument, in words."""
        chosen = ", ".join(map(str, self.foreground))
        if self.name == "binary-0-255":
            return f"instrument where the value is >= {self.threshold} (data.mask_threshold)"
        if self.name == "binary-0-1":
            return "instrument where the value is >= 1 (JPEG noise values 2, 3, ... too)"
        if self.foreground:
            return f"{'values' if self.name == 'labels' else 'indices'} {chosen} are instrument (data.foreground_values)"
        return f"0 is background, every other {'value' if self.name == 'labels' else 'index'} instrument"

    def describe(self) -> str:
        """How a mask is read, in words."""
        return f"{self.title}: {self.rule()}"

    def check(self, mask: MaskValues) -> None:
        """Raise :class:`MaskEncodingError` when ``mask`` does not fit, naming the file and its values."""
        if not self.fits(mask):
            raise MaskEncodingError(misfit_message(mask, self))


def misfit_message(mask: MaskValues, encoding: MaskEncoding | None) -> str:
    """One line: the file, its values, and what was expected."""
    what = f"{mask.format} {mask.source}, values {mask.value_set()}"
    if encoding is None:
        return (f"{mask.path}: mask values fit no encoding ({what}); expected 0/255, 0/1, a label map or a "
                "palette image (a lossless label map with many values reads with data.mask_encoding=labels)")
    return (f"{mask.path}: mask does not fit the dataset's encoding {encoding.name} ({what}); expected "
            f"{encoding.expected()} (set data.mask_encoding to read it otherwise, or convert the file)")


def read_mask(path: str | Path, encoding: MaskEncoding) -> np.ndarray:
    """The mask at ``path``, upright, as uint8 in {0, 1} (H, W), read through the dataset's ``encoding``.

    Raises:
        MaskEncodingError: the file's values do not fit ``encoding``.
        CorruptImageError: the file cannot be decoded.
    """
    array, summary = open_mask(path)
    encoding.check(summary)
    return encoding.instrument(array).astype(np.uint8)
