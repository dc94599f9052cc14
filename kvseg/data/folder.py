"""Reading a segmentation dataset folder: image/mask pairs, splits, and decoding files.

Two layouts are read by the same code:

* **Kvasir-Instrument**: ``ROOT/images/<id>.jpg``, ``ROOT/masks/<id>.png``, ``ROOT/train.txt`` and
  ``ROOT/test.txt`` with one id (file stem) per line.
* **Generic**: ``ROOT/images/`` and ``ROOT/masks/`` matched by file stem, any image type Pillow
  reads on either side (:data:`IMAGE_EXTENSIONS`), images of any size and mode, and no split files:
  the split is then drawn from a seed. Hidden files (``.*``, macOS ``._*``) are not data.

Images are read upright (EXIF orientation applied) and as RGB uint8; how a mask's values become
instrument and background is decided once per dataset in :mod:`kvseg.data.masks`, and the folder check
that reads every pair is :mod:`kvseg.data.check`. The PyTorch ``Dataset`` over these pairs is in
:mod:`kvseg.data.dataset`.
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

from kvseg.errors import (
    CorruptImageError,
    DatasetError,
    DatasetNotFoundError,
    EmptyDatasetError,
    ImageTooLargeError,
    MissingMaskError,
    OrphanMaskError,
)


def _readable_extensions() -> tuple[str, ...]:
    """File endings of the raster formats this Pillow can decode (jpg, png, tif, bmp, gif, webp, ...).

    Left out: stub formats that need a handler Pillow does not ship (BUFR, GRIB, HDF5, WMF), MPEG
    (Pillow identifies it but decodes no frame) and EPS (vector; needs Ghostscript).
    """
    Image.init()
    unusable = {"MPEG", "EPS"}
    usable = {fmt for fmt, (factory, _) in Image.OPEN.items()
              if fmt not in unusable and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in usable))


IMAGE_EXTENSIONS = _readable_extensions()
COMMON_EXTENSIONS = (".jpg", ".png", ".tif", ".bmp", ".gif", ".webp")  # named in messages instead of all of them

# kvseg refuses an image above Image.MAX_IMAGE_PIXELS itself (open_upright), naming the limit; Pillow's
# warning for sizes between one and two times the limit would only repeat that.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Sample:
    """One image and its mask, named by the shared file stem."""

    id: str
    image: Path
    mask: Path


@dataclass(frozen=True)
class PassedOver:
    """A file in images/ or masks/ that is not read as data, and why."""

    path: Path
    reason: str  # "hidden", "of a type Pillow does not read", "subfolder(s)"


@dataclass
class FolderScan:
    """What :func:`scan_folder` found: the pairs, the files passed over, and the files without a partner."""

    root: Path
    samples: dict[str, Sample]
    passed_over: list[PassedOver] = field(default_factory=list)
    images_without_mask: list[str] = field(default_factory=list)
    masks_without_image: list[str] = field(default_factory=list)

    def passed_over_line(self) -> str:
        """One line naming the files passed over, grouped by reason; "" when none was."""
        return describe_passed_over(self.passed_over, self.root)


def describe_passed_over(items: Sequence[PassedOver], root: Path | None = None, limit: int = 3) -> str:
    """``passed over 3 file(s): 2 hidden (images/._a.jpg, masks/.DS_Store); 1 subfolder(s) (...)``; "" for none."""
    if not items:
        return ""
    groups: dict[str, list[str]] = {}
    for item in items:
        name = str(item.path.relative_to(root)) if root is not None and item.path.is_relative_to(root) else str(item.path)
        groups.setdefault(item.reason, []).append(name)
    parts = [f"{len(names)} {reason} ({preview(names, limit)})" for reason, names in groups.items()]
    return f"passed over {len(items)} file(s): " + "; ".join(parts)


def _list_files(folder: Path, passed_over: list[PassedOver]) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{folder}: folder not found (expected images/ and masks/ inside the dataset root)")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # .DS_Store, macOS ._frame.jpg resource forks, editors' swap files
            passed_over.append(PassedOver(path, "hidden"))
        elif path.is_dir():
            passed_over.append(PassedOver(path, "subfolder(s)"))
        elif path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            passed_over.append(PassedOver(path, "of a type Pillow does not read"))
        elif path.stem in files:
            raise DatasetError(f"{path}: two files share the stem '{path.stem}' ({files[path.stem].name}); expected one per id")
        else:
            files[path.stem] = path
    return files


def preview(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def scan_folder(root: str | Path) -> FolderScan:
    """Every image/mask pair under ``root`` (by file stem), the files passed over and those without a partner.

    Raises:
        DatasetNotFoundError: ``root``, ``root/images`` or ``root/masks`` is missing.
        EmptyDatasetError: ``root/images`` holds no image.
        DatasetError: two files in one folder share a stem.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: dataset folder not found (expected a folder with images/ and masks/)")
    passed_over: list[PassedOver] = []
    images = _list_files(root / "images", passed_over)
    masks = _list_files(root / "masks", passed_over)
    if not images:
        note = f"; {describe_passed_over(passed_over, root)}" if passed_over else ""
        raise EmptyDatasetError(f"{root / 'images'}: no images found (expected image files such as "
                                f"{', '.join(COMMON_EXTENSIONS)}){note}")
    pairs = {stem: Sample(stem, images[stem], masks[stem]) for stem in sorted(set(images) & set(masks))}
    return FolderScan(root, pairs, passed_over, sorted(set(images) - set(masks)), sorted(set(masks) - set(images)))


def find_samples(root: str | Path) -> dict[str, Sample]:
    """All image/mask pairs under ``root``, keyed by id (file stem), sorted by id.

    Raises:
        MissingMaskError, OrphanMaskError: an image has no mask or a mask no image (all are counted,
            and files passed over in that folder are named, since one may be the missing partner).
        and the errors of :func:`scan_folder`.
    """
    scan = scan_folder(root)
    for missing, side, other, error in ((scan.images_without_mask, "masks", "mask", MissingMaskError),
                                        (scan.masks_without_image, "images", "image", OrphanMaskError)):
        if missing:
            folder = scan.root / side
            skipped = [item for item in scan.passed_over if item.path.parent == folder]
            note = f"; {describe_passed_over(skipped, scan.root)}" if skipped else ""
            raise error(f"{folder}: no {other} for {len(missing)} {'image' if other == 'mask' else 'mask'}(s): "
                        f"{preview(missing)} (expected {'a' if other == 'mask' else 'an'} {other} with the same "
                        f"file stem){note}")
    return scan.samples


def _too_large(path: Path, pixels: int | None) -> ImageTooLargeError:
    limit = Image.MAX_IMAGE_PIXELS
    size = f"{pixels:,} pixels" if pixels else "more pixels than allowed"
    return ImageTooLargeError(
        f"{path}: {size}, above the limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS, Pillow's decompression-bomb "
        "guard); expected a smaller image", pixels=pixels or 0, limit=limit)


def open_upright(path: str | Path) -> tuple[Image.Image, int]:
    """The image at ``path``, decoded and upright, and the EXIF orientation it had (1: stored upright).

    Orientations 2-8 (a camera held sideways, a scanner's rotation) are applied as every viewer and
    annotation tool applies them, so images and masks are read as they were shown when drawn on.

    Raises:
        ImageTooLargeError: it has more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (None: no limit).
        CorruptImageError: it cannot be decoded (unreadable, truncated or not an image).
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and image.width * image.height > limit:
                raise _too_large(path, image.width * image.height)
            image.load()  # decode now so that a truncated file fails here
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            if orientation != 1:
                ImageOps.exif_transpose(image, in_place=True)
            return image, orientation
    except Image.DecompressionBombError as exc:  # above twice the limit Pillow refuses in open() already
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, int(found.group(1)) if found else None) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptImageError(f"{path}: cannot decode image ({reason}); expected a readable image file") from None


def open_image(path: str | Path) -> Image.Image:
    """The image at ``path``, decoded and upright (see :func:`open_upright`)."""
    return open_upright(path)[0]


def image_to_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 (H, W, 3), a writable array.

    16-bit and float images (modes I;16, I, F) are scaled from their own range [min, max] to
    [0, 255]; clipping them at 255, as a plain mode conversion does, turns every pixel of a
    12- or 16-bit frame white. Greyscale, palette, RGBA and CMYK convert as Pillow converts them.
    """
    if image.mode.startswith("I") or image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return np.repeat(np.rint(scaled).astype(np.uint8)[..., None], 3, axis=2)
    try:
        return np.array(image.convert("RGB"))
    except ValueError as exc:
        raise CorruptImageError(f"{image.filename or 'image'}: cannot convert mode {image.mode} to RGB ({exc})") from None


def read_image(path: str | Path) -> np.ndarray:
    """The image at ``path``, upright, as RGB uint8 (H, W, 3); see :func:`open_image` and :func:`image_to_rgb`."""
    return image_to_rgb(open_image(path))


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an image to ``size`` x ``size``: area interpolation when shrinking, linear when growing."""
    if image.shape[:2] == (size, size):
        return image
    shrink = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``size`` x ``size``: the image by :func:`resize_image`, the mask by nearest neighbour."""
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]} but mask is {mask.shape[1]}x{mask.shape[0]}")
    if image.shape[:2] != (size, size):
        mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    return resize_image(image, size), mask
