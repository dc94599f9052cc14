"""The data users really bring: mask encodings, image modes, EXIF orientation, stray files, degenerate sets.

Each test makes its own tiny inputs and asserts the value a broken reader would get wrong: the
instrument pixel count of a mask (within 1% of the shape drawn) or where a shape lies in an image.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import REPO, TINY_TRAINING, cli_error
from kvseg.cli import run_cli
from kvseg.commands.check import main as check_main
from kvseg.config import AugmentConfig, load_config
from kvseg.data.augment import build_eval_transform
from kvseg.data.check import check_folder
from kvseg.data.dataset import SegmentationDataset
from kvseg.data.folder import find_samples, read_image, scan_folder
from kvseg.data.masks import MaskEncoding
from kvseg.errors import ConfigError, ImageTooLargeError, MaskEncodingError, MissingMaskError
from kvseg.evaluation.datasets import eval_datasets
from kvseg.models.build import check_model_config
from kvseg.models.unet import UNet
from kvseg.runs.folder import Progress, RunDir

KVASIR_SEG = REPO.parent / "shared" / "data" / "kvasir-seg-dev"  # Jha et al., "Kvasir-SEG", MMM 2020


def ellipse(size: tuple[int, int], box: tuple[int, int, int, int], value: int = 1, base: np.ndarray | None = None) -> np.ndarray:
    """A (H, W) uint8 array with a filled ellipse of ``value`` in ``box`` (x0, y0, x1, y1), over ``base``."""
    image = Image.fromarray(base) if base is not None else Image.new("L", size, 0)
    ImageDraw.Draw(image).ellipse(box, fill=value)
    return np.array(image)


def make_folder(root: Path, masks: dict[str, Image.Image], mask_ext: str = ".png", image_ext: str = ".jpg") -> Path:
    """``root/images/<id><image_ext>`` (noise of the mask's size) and ``root/masks/<id><mask_ext>``."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for name, mask in masks.items():
        noise = rng.integers(0, 255, (mask.height, mask.width, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / "images" / f"{name}{image_ext}")
        mask.save(root / "masks" / f"{name}{mask_ext}", **({"quality": 90} if mask_ext == ".jpg" else {}))
    return root


def instrument_counts(root: Path, size: int = 64, **kwargs) -> list[int]:
    """Instrument pixels of every mask as :class:`SegmentationDataset` reads them (no resize, no transform)."""
    dataset = SegmentationDataset(list(find_samples(root).values()), image_size=size, **kwargs)
    return [int(dataset[i][1].sum()) for i in range(len(dataset))]


# ---------------------------------------------------------------------------------------------
# Mask encodings


def test_jpeg_01_masks_are_read_with_their_noise(tmp_path: Path) -> None:
    # Case 1: 0/1 masks saved as JPEG get a few 2s at the edges; they are not "only 0 and 1" any more.
    boxes = [(16, 16, 48, 48), (9, 9, 55, 55), (6, 6, 58, 58)]
    drawn = {f"m{i}": ellipse((64, 64), box) for i, box in enumerate(boxes)}
    root = make_folder(tmp_path, {k: Image.fromarray(v) for k, v in drawn.items()}, mask_ext=".jpg")
    for name in drawn:  # the noise is there: the file is not "only 0 and 1"
        assert np.asarray(Image.open(root / "masks" / f"{name}.jpg")).max() == 2
    counts = instrument_counts(root)
    for count, mask in zip(counts, drawn.values()):
        assert count == pytest.approx(int(mask.sum()), rel=0.01)
    report = check_folder(root)
    assert report.decision.encoding.name == "binary-0-1" and report.ok
    assert "0/1 with JPEG noise" in report.decision.value_sets()


def test_label_map_any_non_zero_class_is_instrument_unless_told(tmp_path: Path) -> None:
    # Case 2: values {0, 1, 2}, two kinds of instrument.
    both = ellipse((64, 64), (40, 40, 60, 60), 2, ellipse((64, 64), (4, 4, 30, 30), 1))
    root = make_folder(tmp_path, {"a": Image.fromarray(both), "b": Image.fromarray(both.T.copy())})
    expected = int((both > 0).sum())
    assert instrument_counts(root) == [expected, expected]
    only_two = SegmentationDataset(list(find_samples(root).values()), 64, encoding=MaskEncoding("labels", foreground=(2,)))
    assert int(only_two[0][1].sum()) == int((both == 2).sum())
    cfg = load_config(overrides=["data.foreground_values=[2]"])
    assert check_folder(root, cfg.data).decision.encoding == MaskEncoding("labels", foreground=(2,))
    with pytest.raises(ConfigError, match="data.foreground_values"):
        load_config(overrides=["data.foreground_values=[2]", "data.mask_encoding=binary-0-255"])


def test_palette_mask_means_its_indices(tmp_path: Path) -> None:
    # Case 3: labelme / VOC palette masks; index 1 is dark red (64, 0, 0), under 128 in every channel.
    drawn = ellipse((64, 64), (8, 10, 40, 50))
    mask = Image.new("P", (64, 64))
    mask.frombytes(drawn.tobytes())
    mask.putpalette([0, 0, 0, 64, 0, 0] + [0, 0, 0] * 254)
    root = make_folder(tmp_path, {"a": mask, "b": mask})
    assert instrument_counts(root) == [int(drawn.sum())] * 2
    assert check_folder(root).decision.encoding.name == "palette"


def test_mixed_or_unreadable_masks_are_refused_with_file_and_values(tmp_path: Path) -> None:
    disc = ellipse((64, 64), (10, 10, 50, 50), 255)
    masks = {f"j{i}": Image.fromarray(disc) for i in range(3)}
    root = make_folder(tmp_path, masks, mask_ext=".jpg")
    Image.fromarray(disc // 255).save(root / "masks" / "j1.png")  # a 0/1 PNG among 0/255 JPEGs
    (root / "masks" / "j1.jpg").unlink()
    photo = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(photo).save(root / "masks" / "j2.jpg")  # an image saved into masks/ by mistake
    with pytest.raises(MaskEncodingError, match=r"j1\.png.*binary-0-255.*\{0, 1\}"):
        SegmentationDataset(list(find_samples(root).values()), 64)
    report = check_folder(root)
    assert not report.ok
    assert any("j1.png" in e and "{0, 1}" in e for e in report.errors)
    assert any("j2.jpg" in e and "fit no encoding" in e for e in report.errors)


# ---------------------------------------------------------------------------------------------
# Images


def test_16_bit_and_float_images_are_scaled_by_their_range(tmp_path: Path) -> None:
    # Case 4: a 16-bit frame with values 600-3500; clipped at 255 every pixel is white.
    frame = np.full((48, 64), 600, np.uint16)
    frame[10:30, 20:50] = 3500
    Image.fromarray(frame).save(tmp_path / "frame16.png")
    Image.fromarray(frame.astype(np.float32) / 4000).save(tmp_path / "frame.tif")
    for name in ("frame16.png", "frame.tif"):
        image = read_image(tmp_path / name)
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8
        assert image[10:30, 20:50].min() == 255 and image[frame == 600].max() == 0, name


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_other_image_modes_keep_working(tmp_path: Path, mode: str) -> None:
    rgb = np.zeros((40, 56, 3), np.uint8)
    rgb[5:20, 30:50] = 250
    image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / ("frame.tif" if mode == "CMYK" else "frame.png")
    image.save(path)
    read = read_image(path).mean(axis=2)
    assert read[5:20, 30:50].min() > 200 and read[rgb[..., 0] == 0].max() < 30


def _sideways_jpeg(path: Path, upright: np.ndarray) -> None:
    """Store ``upright`` turned a quarter counter-clockwise, with EXIF Orientation 6 ("rotate 90 CW to show")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(path, exif=exif, quality=95)


def test_exif_orientation_reads_images_and_masks_upright(tmp_path: Path) -> None:
    # Case 5: a portrait frame stored sideways; its mask was drawn on the upright view.
    upright = np.zeros((64, 48, 3), np.uint8)
    upright[2:18, 2:14] = (255, 0, 0)  # a red block at the top left, as shown
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    _sideways_jpeg(root / "images" / "a.jpg", upright)
    assert Image.open(root / "images" / "a.jpg").size == (64, 48)  # stored landscape
    Image.fromarray((upright[..., 0] > 0).astype(np.uint8) * 255).save(root / "masks" / "a.png")
    _sideways_jpeg(root / "images" / "b.jpg", upright)
    _sideways_jpeg(root / "masks" / "b.jpg", np.repeat((upright[..., :1] > 0).astype(np.uint8) * 255, 3, axis=2))
    dataset = SegmentationDataset(list(find_samples(root).values()), image_size=64)
    for index in range(2):
        image, mask = dataset.load(index)  # resized to 64x64: the block keeps its top-left place
        assert image[3:20, 3:15, 0].mean() > 200 and image[40:, 30:, 0].mean() < 30
        assert mask.sum() == pytest.approx(16 * 12 * 64 / 48, rel=0.05) and mask[3:17, 4:17].all()
    report = check_folder(root)
    assert report.ok and not report.mismatches and "2 turned upright by their EXIF orientation" in "\n".join(report.lines())


@pytest.fixture(scope="module")
def predict_run(fresh_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(fresh_run, tmp_path_factory.mktemp("predict") / "run"))


def test_predict_writes_masks_at_the_shown_size(predict_run: Path, tmp_path: Path) -> None:
    upright = np.zeros((64, 48, 3), np.uint8)
    upright[2:18, 2:14] = 200
    _sideways_jpeg(tmp_path / "portrait.jpg", upright)
    assert run_cli(__import__("kvseg.predict", fromlist=["main"]).main,
                   ["--run", str(predict_run), str(tmp_path / "portrait.jpg"), "--out", str(tmp_path / "out")]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "portrait_mask.png"))
    assert written.shape == (64, 48)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` grey pixels and holds almost none: opening reads the size only."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_large_images_are_refused_naming_max_pixels(predict_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    # Case 8: a 200-megapixel frame; Pillow's guard refuses it. predict names --max-pixels, which allows it.
    from kvseg.commands.predict import main as predict_main

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    (tmp_path / "huge.png").write_bytes(_png_header(20000, 10000))  # 200 MP: Pillow itself raises
    (tmp_path / "big.png").write_bytes(_png_header(10000, 10000))  # 100 MP: Pillow only warns
    for name, pixels in (("huge.png", 200_000_000), ("big.png", 100_000_000)):
        with pytest.raises(ImageTooLargeError) as info:
            read_image(tmp_path / name)
        assert info.value.pixels == pixels and name in str(info.value)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(small)
    args = ["--run", str(predict_run), str(tmp_path / "huge.png"), "--out", str(tmp_path / "out")]
    assert run_cli(predict_main, args) == 2
    assert "--max-pixels 200000000" in capsys.readouterr().err
    small_args = ["--run", str(predict_run), str(small), "--out", str(tmp_path / "small"), "--max-pixels"]
    assert run_cli(predict_main, [*small_args, "3000"]) == 2
    assert "--max-pixels 3072" in capsys.readouterr().err
    assert not (tmp_path / "small" / "small_mask.png").exists()
    assert run_cli(predict_main, [*small_args, "3072"]) == 0
    assert (tmp_path / "small" / "small_mask.png").is_file()


# ---------------------------------------------------------------------------------------------
# Files and folders


def test_hidden_files_are_not_data_and_are_named(tmp_path: Path) -> None:
    # Case 6: macOS leaves ._frame0.jpg (AppleDouble) beside every file copied from its disks.
    root = make_folder(tmp_path, {f"frame{i}": Image.fromarray(ellipse((48, 48), (5, 5, 30, 30), 255)) for i in range(3)})
    for folder, name in (("images", "._frame0.jpg"), ("masks", "._frame0.png"), ("images", ".DS_Store")):
        (root / folder / name).write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (root / "masks" / "notes.txt").write_text("drawn by A.\n")
    assert sorted(find_samples(root)) == ["frame0", "frame1", "frame2"]
    line = scan_folder(root).passed_over_line()
    assert line.startswith("passed over 4 file(s): 3 hidden (") and "images/._frame0.jpg" in line
    assert "1 of a type Pillow does not read (masks/notes.txt)" in line
    assert instrument_counts(root, 48) == [int((ellipse((48, 48), (5, 5, 30, 30)) > 0).sum())] * 3


def test_gif_and_webp_masks_are_read_and_skipped_files_named(tmp_path: Path) -> None:
    # Case 7: the Carvana layout, id.jpg + id.gif; and a mask type Pillow cannot read.
    drawn = ellipse((64, 64), (6, 8, 40, 44), 255)
    root = make_folder(tmp_path, {"car1": Image.fromarray(drawn), "car2": Image.fromarray(drawn)}, mask_ext=".gif")
    Image.fromarray(drawn).save(root / "masks" / "car2.gif")
    make_folder(root, {"car3": Image.fromarray(drawn)}, mask_ext=".webp")
    assert instrument_counts(root) == [int((drawn > 0).sum())] * 3
    (root / "masks" / "car3.webp").rename(root / "masks" / "car3.heic")
    with pytest.raises(MissingMaskError) as info:
        find_samples(root)
    message = str(info.value)
    assert "car3" in message and "masks/car3.heic" in message and "of a type Pillow does not read" in message


# ---------------------------------------------------------------------------------------------
# Degenerate sets and failed runs


def test_report_renders_when_every_test_mask_is_empty(predict_run: Path, synthetic_root: Path, tmp_path: Path) -> None:
    # Case 9: frames without instruments; AP and ROC AUC are undefined, every figure still renders.
    from kvseg.commands.report import main as report_main
    from kvseg.evaluation.report import FIGURES

    data = Path(shutil.copytree(synthetic_root, tmp_path / "data"))
    for sample_id in (predict_run / "test.txt").read_text().split():
        Image.fromarray(np.zeros((64, 80), np.uint8)).save(data / "masks" / f"{sample_id}.png")
    run = Path(shutil.copytree(predict_run, tmp_path / "run"))
    assert run_cli(report_main, [str(run), "--data-dir", str(data)]) == 0
    page = (run / "index.html").read_text()
    assert page.count("undefined (the split has no foreground pixel)") == 2  # AP and ROC AUC
    for name in FIGURES:
        image = np.asarray(Image.open(run / name).convert("L"))
        assert image.shape[0] > 200 and image.std() > 10, name


def test_image_size_too_small_for_the_depth_is_a_config_error() -> None:
    # Case 10: 16 px at depth 4 leaves a 1x1 bottleneck; BatchNorm cannot train a batch of one there.
    with pytest.raises(ConfigError, match=r"data.image_size.*16.*1x1"):
        check_model_config(load_config(overrides=["data.image_size=16"]))
    cfg = load_config(overrides=["data.image_size=32"])  # 2x2 at the bottleneck: one image trains
    check_model_config(cfg)
    model = UNet(base_channels=4, depth=cfg.model.depth).train()
    model(torch.randn(1, 3, 32, 32)).sum().backward()


def _train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_ddp.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240)


def test_a_failed_start_leaves_nothing_that_blocks_the_next(dataset_copy: Path, tmp_path: Path) -> None:
    # Case 11: bad data stops the run; after the fix the same --run-name starts, and no message names a missing file.
    common = ["--data-dir", str(dataset_copy), "--epochs", "1", "--output-dir", str(tmp_path), "--run-name", "r",
              "--set", "eval.tta=[]", *TINY_TRAINING]
    broken = dataset_copy / "images" / "synth0007.jpg"
    good = broken.read_bytes()
    broken.write_bytes(good[:200])
    assert "synth0007.jpg" in cli_error("train_ddp", *common)
    assert not (tmp_path / "r").exists()  # stopped by the folder check, before the run folder was made
    broken.write_bytes(good)
    again = _train(*common, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    run = tmp_path / "r"
    assert (run / "checkpoints" / "last.pt").is_file() and "Epoch [1/1]" in again.stdout
    # The folder summary comes before epoch 1, and the decided encoding is kept with the run.
    assert "32 image/mask pairs" in again.stdout and "masks: binary 0/255" in again.stdout
    assert again.stdout.index("masks: binary 0/255") < again.stdout.index("Epoch [1/1]")
    cfg = load_config(run / "config.yaml")
    assert cfg.data.mask_encoding == "binary-0-255"
    assert eval_datasets(cfg, RunDir(run))["test"].encoding == MaskEncoding("binary-0-255")  # report and export read so
    assert json.loads((run / "metrics.json").read_text())["test"]["num_images"] > 0


def test_a_loss_that_is_not_finite_in_epoch_1_names_no_checkpoint(tmp_path: Path) -> None:
    from kvseg.training.train import EpochStats, NonFiniteLossError, check_finite

    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    with pytest.raises(NonFiniteLossError) as info:
        check_finite(EpochStats(float("nan"), 1.0, 8, 1e-3), 1, run, Progress())
    assert "nothing was saved" in str(info.value) and "last.pt" not in str(info.value) and not run.last.exists()


def test_real_kvasir_seg_frames(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Kvasir-SEG (Jha et al., MMM 2020): RGB JPEG 0/255 masks with compression noise, 256x256 frames.
    # Case 13: at their own size the arrays go to torch unchanged and must be writable.
    if not KVASIR_SEG.is_dir():
        pytest.skip(f"{KVASIR_SEG} not present")
    ids = sorted(p.stem for p in (KVASIR_SEG / "images").iterdir())[:4]
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
        for i in ids:
            shutil.copy(KVASIR_SEG / folder / f"{i}.jpg", tmp_path / folder)
    dataset = SegmentationDataset(list(find_samples(tmp_path).values()), 256, build_eval_transform(AugmentConfig()),
                                  cache=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for index in range(len(dataset)):
            image, mask = dataset.load(index)
            assert image.flags.writeable and mask.flags.writeable
            dataset[index]
            raw = np.asarray(Image.open(dataset.samples[index].mask)).max(axis=2)
            assert int(mask.sum()) == int((raw >= 128).sum()) > 0
    assert run_cli(check_main, [str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4 image/mask pairs" in out and "upright): 256x256: 4" in out and "masks: binary 0/255" in out
    assert "0/255 with JPEG noise" in out and "Result: OK" in out


def test_folder_check_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    disc = ellipse((48, 48), (8, 8, 40, 40), 255)
    root = make_folder(tmp_path / "data", {f"f{i}": Image.fromarray(disc) for i in range(6)}, image_ext=".png")
    shutil.copy(root / "images" / "f0.png", root / "images" / "f5.png")  # the same frame under a second id
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(root / "masks" / "f4.png")  # no instrument in this frame
    for name in ("f1", "f2"):  # drawn on another size
        Image.fromarray(ellipse((40, 48), (8, 8, 30, 30), 255)).save(root / "masks" / f"{name}.png")
    (root / "images" / "._f0.png").write_bytes(b"\x00\x05\x16\x07")
    assert run_cli(check_main, [str(root)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and len(captured.err.strip().splitlines()) == 1
    out = captured.out
    assert "6 image/mask pairs; passed over 1 file(s): 1 hidden (images/._f0.png)" in out
    assert "upright): 48x48: 6" in out and "modes: RGB PNG: 6" in out
    assert "2 image/mask size mismatch(es)" in out and "f1.png: mask is 40x48" in out and "f2.png: mask is 40x48" in out
    assert "duplicates: 1 group(s) with the same decoded pixels: f0 = f5" in out
    assert "1 empty mask(s): f4" in out and "no split files" in out and "Result: NOT OK, 2 error(s), 2 warning(s)" in out
