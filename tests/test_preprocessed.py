"""The persistent on-disk frame cache (kvseg.data.preprocessed) and the loader-only benchmark."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import kvseg.bench.loader
import kvseg.data.preprocessed
from conftest import kvseg_messages
from kvseg.bench.loader import loader_markdown, measure_loader, worker_counts
from kvseg.config import load_config
from kvseg.data.dataset import SegmentationDataset, build_datasets, dataset_frames
from kvseg.data.encodings import dataset_encoding
from kvseg.data.folder import find_samples
from kvseg.data.masks import MaskEncoding
from kvseg.data.preprocessed import CacheUnavailable, decode_pair, open_or_build, resolve_cache_dir
from kvseg.errors import ConfigError, CorruptImageError

BINARY = MaskEncoding("binary-0-255")


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir()) if cache.exists() else []


def test_entry_holds_the_decoded_pairs_and_a_second_open_decodes_nothing(dataset_copy: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    samples = list(find_samples(dataset_copy).values())
    frames = open_or_build(samples, 32, BINARY, tmp_path / "cache")
    lines = kvseg_messages(caplog)
    assert len(lines) == 1 and "decoded 32 pairs at 32 px" in lines[0]
    for sample in samples[:5]:
        image, mask = frames.pair(sample.id)
        expected_image, expected_mask = decode_pair(sample, 32, BINARY)
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3) and set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(image, expected_image) and np.array_equal(mask, expected_mask)
        assert image.flags.writeable, "torch.from_numpy of a read-only map would warn"

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(kvseg.data.preprocessed, "decode_pair", no_decoding)
    again = open_or_build(samples, 32, BINARY, tmp_path / "cache")
    assert again.folder == frames.folder and len(kvseg_messages(caplog)) == 1
    assert np.array_equal(again.pair(samples[0].id)[0], frames.pair(samples[0].id)[0])


def test_a_changed_file_size_or_encoding_makes_a_new_entry(dataset_copy: Path, tmp_path: Path) -> None:
    samples = list(find_samples(dataset_copy).values())
    cache = tmp_path / "cache"
    first = open_or_build(samples, 32, BINARY, cache).folder
    assert open_or_build(samples, 48, BINARY, cache).folder != first
    assert open_or_build(samples, 32, MaskEncoding("binary-0-255", threshold=200), cache).folder != first
    stat = samples[3].mask.stat()
    os.utime(samples[3].mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the mask was edited
    changed = open_or_build(samples, 32, BINARY, cache).folder
    assert changed != first and len(_entries(cache)) == 4
    assert not [p for p in _entries(cache) if p.name.startswith(".building")]


def test_a_broken_file_leaves_no_entry_behind(dataset_copy: Path, tmp_path: Path) -> None:
    samples = list(find_samples(dataset_copy).values())
    samples[-1].image.write_bytes(b"not an image")
    cache = tmp_path / "cache"
    with pytest.raises(CorruptImageError, match=samples[-1].image.name):
        open_or_build(samples, 32, BINARY, cache)
    assert _entries(cache) == [], "a later run must not read a half-written entry"


def test_the_cache_is_never_inside_the_data_folder(dataset_copy: Path) -> None:
    with pytest.raises(ConfigError, match="config key 'data.cache_dir' is .*inside the data folder"):
        resolve_cache_dir(str(dataset_copy / "cache"), dataset_copy)
    assert resolve_cache_dir("", dataset_copy) == Path(os.environ["KVSEG_CACHE_DIR"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KVSEG_CACHE_DIR", str(dataset_copy / ".cache"))
        with pytest.raises(ConfigError, match=r"^\$KVSEG_CACHE_DIR is .*inside the data folder"):
            resolve_cache_dir("", dataset_copy)


def test_an_unwritable_cache_falls_back_to_shared_memory_with_one_line(dataset_copy: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = load_config(overrides=[f"data.root={dataset_copy}", "data.image_size=32", f"data.cache_dir={blocker}/cache"])
    samples = find_samples(dataset_copy)
    with pytest.raises(CacheUnavailable):
        open_or_build(list(samples.values()), 32, BINARY, blocker / "cache")
    datasets = build_datasets(cfg, samples, {"train": list(samples)[:8]})
    lines = kvseg_messages(caplog)
    assert len(lines) == 1 and lines[0].startswith("note: no on-disk cache") and str(blocker) in lines[0]
    assert datasets["train"].source == "shared memory"


def test_datasets_read_the_cache_in_workers_and_pickle_no_arrays(dataset_copy: Path, tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"data.root={dataset_copy}", "data.image_size=32", f"data.cache_dir={tmp_path}/c"])
    samples = find_samples(dataset_copy)
    frames = dataset_frames(cfg.data, samples, dataset_encoding(cfg.data, [s.mask for s in samples.values()]))
    assert len(pickle.dumps(frames)) < 4096, "spawned workers reopen the files instead of receiving the arrays"
    dataset = SegmentationDataset(list(samples.values())[:8], 32, frames=frames)
    assert dataset.source == "disk cache"
    for sample in samples.values():  # nothing may read the files any more
        sample.image.unlink()
    loaded = torch.cat([images for images, _, _ in DataLoader(dataset, batch_size=4, num_workers=2)])
    expected = torch.stack([torch.from_numpy(frames.pair(s.id)[0]) for s in dataset.samples])
    assert torch.equal(loaded, expected)
    with pytest.raises(ValueError, match="does not hold every sample at 48 px"):
        SegmentationDataset(dataset.samples, 48, frames=frames)


def test_cache_setting_and_its_legacy_bool() -> None:
    assert load_config().data.cache == "disk"
    assert load_config(overrides=["data.cache=true"]).data.cache == "disk"
    assert load_config(overrides=["data.cache=false"]).data.cache == "off"
    with pytest.raises(ConfigError, match="'data.cache' is 'ram'; expected one of disk, memory, off"):
        load_config(overrides=["data.cache=ram"])


def test_worker_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_counts(load_config(overrides=["data.num_workers=4"])) == [1, 4]
    assert worker_counts(load_config(overrides=["data.num_workers=0"])) == [1]
    monkeypatch.setattr(kvseg.bench.loader, "default_num_workers", lambda: 7)
    assert worker_counts(load_config()) == [1, 7]


def test_loader_benchmark_reports_both_paths_beside_the_step(dataset_copy: Path) -> None:
    cfg = load_config(overrides=["data.image_size=32", "train.batch_size=4", "data.num_workers=2", "model.base_channels=4",
                                 "model.depth=2"])
    samples = list(find_samples(dataset_copy).values())[:12]
    report = measure_loader(cfg, samples, BINARY, seconds=0.2, sizes=[32, 48])
    assert [entry["image_size"] for entry in report["sizes"]] == [32, 48] and report["workers"] == [1, 2]
    for entry in report["sizes"]:
        size = entry["image_size"]
        rows = {(row["path"], row["source"], row["workers"]): row for row in entry["rows"]}
        assert set(rows) == {(p, s, w) for p in ("workers", "device") for s in ("decode", "disk cache") for w in (1, 2)}
        assert all(row["images_per_s"] > 0 and row["images_timed"] > 0 for row in entry["rows"])
        two = rows["workers", "disk cache", 2]
        assert two["per_worker"] == pytest.approx(two["images_per_s"] / 2)
        # float32 image (3 S S x 4 bytes) + uint8 mask + int64 index, against uint8 image + mask + index
        assert rows["workers", "disk cache", 1]["bytes_per_image"] == 13 * size * size + 8
        assert rows["device", "disk cache", 1]["bytes_per_image"] == 4 * size * size + 8
        assert entry["cache_mib"] > 0 and entry["step"]["images_per_s"] > 0 and entry["step"]["steps"] >= 1
        assert entry["device_augment"]["images_per_s"] > 0 and entry["device_augment"]["device"] == "cpu"
    table = "\n".join(loader_markdown(report))
    assert table.count("| 48 | device | disk cache |") == 2
    verdict = [line for line in table.splitlines() if "the loader delivers" in line]
    assert len(verdict) == 4 and all(" x what the step consumes (" in line for line in verdict)
    entry = report["sizes"][1]
    delivered = next(r for r in entry["rows"] if (r["path"], r["source"], r["workers"]) == ("device", "disk cache", 2))
    assert f"{delivered['images_per_s'] / entry['step']['images_per_s']:.1f} x" in verdict[3]


@pytest.mark.parametrize("damage", ["garbage index", "ids missing", "masks truncated", "images deleted"])
def test_a_damaged_entry_is_said_and_written_again(dataset_copy: Path, tmp_path: Path, damage: str,
        caplog: pytest.LogCaptureFixture) -> None:
    samples = list(find_samples(dataset_copy).values())
    entry = open_or_build(samples, 32, BINARY, tmp_path / "cache").folder
    if damage == "garbage index":
        (entry / "frames.json").write_text("{not json")
    elif damage == "ids missing":
        index = json.loads((entry / "frames.json").read_text())
        (entry / "frames.json").write_text(json.dumps({**index, "ids": index["ids"][:-1]}))
    elif damage == "masks truncated":
        with (entry / "masks.npy").open("r+b") as f:
            f.truncate(1000)
    else:
        (entry / "images.npy").unlink()
    caplog.clear()
    frames = open_or_build(samples, 32, BINARY, tmp_path / "cache")
    lines = kvseg_messages(caplog)
    assert lines[0].startswith(f"note: cache entry {entry} is damaged") and "decoded 32 pairs" in lines[1]
    assert frames.folder == entry
    assert np.array_equal(frames.pair(samples[-1].id)[1], decode_pair(samples[-1], 32, BINARY)[1])


def test_no_shared_memory_means_decoding_with_one_note(dataset_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    share = torch.Tensor.share_memory_

    def no_space(self: torch.Tensor) -> torch.Tensor:  # room for the epoch counter, none for the images
        if self.numel() > 1:
            raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1>: No space left on device (28)")
        return share(self)

    monkeypatch.setattr(torch.Tensor, "share_memory_", no_space)
    samples = list(find_samples(dataset_copy).values())[:4]
    datasets = [SegmentationDataset(samples, 32, cache=True) for _ in range(2)]
    assert [d.source for d in datasets] == ["decoding", "decoding"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("note: no shared-memory cache (unable to allocate shared memory")
    assert torch.equal(datasets[0][0][0], torch.from_numpy(decode_pair(samples[0], 32, BINARY)[0]))
