from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import disk_mask
from kvseg.data.dataset import SegmentationDataset
from kvseg.data.folder import find_samples, read_image
from kvseg.data.masks import MaskEncoding, read_mask
from kvseg.data.splits import resolve_split, write_split
from kvseg.errors import (
    CorruptImageError,
    DatasetNotFoundError,
    EmptyDatasetError,
    MissingMaskError,
    OrphanMaskError,
    SplitError,
)


def test_reads_official_layout(synthetic_root: Path) -> None:
    samples = find_samples(synthetic_root)
    assert len(samples) == 32
    split = resolve_split(synthetic_root, samples, seed=0, test_fraction=0.5)
    assert split.source == "split files"
    listed = (synthetic_root / "train.txt").read_text().split()
    assert split.train == listed
    assert not set(split.train) & set(split.test)
    assert len(split.train) + len(split.test) == 32


def test_reads_generic_layout(generic_root: Path) -> None:
    samples = find_samples(generic_root)
    assert sorted(samples) == ["a", "b", "c", "d", "e"]
    dataset = SegmentationDataset(list(samples.values()), image_size=32)
    assert dataset.encoding.name == "binary-0-255"  # decided once, from all five masks
    for sample in samples.values():
        mask = read_mask(sample.mask, dataset.encoding)
        image = read_image(sample.image)
        assert mask.shape == image.shape[:2]
        assert set(np.unique(mask)) == {0, 1}
        expected = disk_mask(*mask.shape)
        assert np.mean(mask != expected) < 0.01, sample.mask
    jpeg = cv2.imread(str(samples["d"].mask), cv2.IMREAD_GRAYSCALE)
    assert len(np.unique(jpeg)) > 2  # the JPEG mask really has grey values
    for i in range(len(dataset)):
        image, mask, index = dataset[i]
        assert image.shape == (32, 32, 3) and mask.shape == (1, 32, 32) and index == i
        assert set(torch.unique(mask).tolist()) <= {0, 1}


def test_seeded_split_is_deterministic_and_written_to_run_folder(generic_root: Path, tmp_path: Path) -> None:
    samples = find_samples(generic_root)
    first = resolve_split(generic_root, samples, seed=1, test_fraction=0.4)
    assert first == resolve_split(generic_root, samples, seed=1, test_fraction=0.4)
    assert first.source == "seed 1" and len(first.test) == 2 and len(first.train) == 3
    others = {tuple(resolve_split(generic_root, samples, seed=s, test_fraction=0.4).test) for s in range(10)}
    assert len(others) > 1
    write_split(first, tmp_path / "run")
    assert (tmp_path / "run" / "test.txt").read_text().split() == first.test
    assert not (generic_root / "train.txt").exists()


def test_one_split_file_gives_the_complement(dataset_copy: Path) -> None:
    (dataset_copy / "train.txt").unlink()
    samples = find_samples(dataset_copy)
    split = resolve_split(dataset_copy, samples, seed=0, test_fraction=0.5)
    assert sorted(split.train + split.test) == sorted(samples)


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        find_samples(tmp_path / "nowhere")
    (tmp_path / "d" / "images").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="masks"):
        find_samples(tmp_path / "d")
    (tmp_path / "d" / "masks").mkdir()
    with pytest.raises(EmptyDatasetError, match="no images"):
        find_samples(tmp_path / "d")


def test_image_without_mask_lists_them(dataset_copy: Path) -> None:
    for name in ("synth0001", "synth0002"):
        (dataset_copy / "masks" / f"{name}.png").unlink()
    with pytest.raises(MissingMaskError) as info:
        find_samples(dataset_copy)
    assert "synth0001" in str(info.value) and "synth0002" in str(info.value) and "2 image(s)" in str(info.value)


def test_mask_without_image(dataset_copy: Path) -> None:
    (dataset_copy / "images" / "synth0003.jpg").unlink()
    with pytest.raises(OrphanMaskError, match="synth0003"):
        find_samples(dataset_copy)


def test_truncated_and_garbage_images_name_the_file(dataset_copy: Path) -> None:
    path = dataset_copy / "images" / "synth0004.jpg"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CorruptImageError, match="synth0004.jpg"):
        read_image(path)
    garbage = dataset_copy / "masks" / "synth0005.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(CorruptImageError, match="synth0005.png"):
        read_mask(garbage, MaskEncoding("binary-0-255"))


def test_split_file_with_unknown_id(dataset_copy: Path) -> None:
    with (dataset_copy / "test.txt").open("a") as f:
        f.write("no_such_image\n")
    with pytest.raises(SplitError, match=r"test.txt:\d+: id 'no_such_image'"):
        resolve_split(dataset_copy, find_samples(dataset_copy), seed=0, test_fraction=0.2)


def test_an_id_listed_twice_is_refused(dataset_copy: Path) -> None:
    first_train = (dataset_copy / "train.txt").read_text().split()[0]
    with (dataset_copy / "train.txt").open("a") as f:
        f.write(first_train + "\n")  # it would be trained twice per epoch, or land in train and validation
    with pytest.raises(SplitError, match=rf"train.txt:\d+: id '{first_train}' is listed twice \(also on line 1"):
        resolve_split(dataset_copy, find_samples(dataset_copy), seed=0, test_fraction=0.2)


def test_split_overlap_is_refused(dataset_copy: Path) -> None:
    first_train = (dataset_copy / "train.txt").read_text().split()[0]
    with (dataset_copy / "test.txt").open("a") as f:
        f.write(first_train + "\n")
    with pytest.raises(SplitError, match="both"):
        resolve_split(dataset_copy, find_samples(dataset_copy), seed=0, test_fraction=0.2)


def test_shared_cache_is_filled_by_workers_and_skips_decoding(dataset_copy: Path) -> None:
    samples = list(find_samples(dataset_copy).values())[:8]
    dataset = SegmentationDataset(samples, image_size=32, cache=True)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True)
    first = torch.cat([images for images, _, _ in loader])
    images_cache, _, filled = dataset._cache
    assert bool(filled.all()), "workers wrote into the cache shared with the main process"
    assert torch.equal(images_cache, first)
    for sample in samples:  # later epochs must not touch the files again
        sample.image.unlink()
    second = torch.cat([images for images, _, _ in loader])
    assert torch.equal(first, second)


def test_validation_is_carved_from_train_by_seed_and_never_from_test(dataset_copy: Path) -> None:
    samples = find_samples(dataset_copy)
    split = resolve_split(dataset_copy, samples, seed=0, test_fraction=0.2, val_fraction=0.25)
    official_test = (dataset_copy / "test.txt").read_text().split()
    assert split.test == official_test
    assert len(split.val) == round(0.25 * (len(samples) - len(official_test)))
    assert sorted(split.train + split.val) == sorted((dataset_copy / "train.txt").read_text().split())
    assert split == resolve_split(dataset_copy, samples, seed=0, test_fraction=0.2, val_fraction=0.25)
    assert split.val != resolve_split(dataset_copy, samples, seed=1, test_fraction=0.2, val_fraction=0.25).val
    assert "validation drawn by seed 0" in split.source
    assert resolve_split(dataset_copy, samples, seed=0, test_fraction=0.2, val_fraction=0.0).val == []


def test_val_txt_is_honoured_and_checked(dataset_copy: Path, tmp_path: Path) -> None:
    train = (dataset_copy / "train.txt").read_text().split()
    (dataset_copy / "train.txt").write_text("\n".join(train[3:]) + "\n")
    (dataset_copy / "val.txt").write_text("\n".join(train[:3]) + "\n")
    split = resolve_split(dataset_copy, find_samples(dataset_copy), seed=0, test_fraction=0.2, val_fraction=0.5)
    assert split.val == train[:3] and split.train == train[3:]
    write_split(split, tmp_path / "run")
    assert (tmp_path / "run" / "val.txt").read_text().split() == train[:3]
    (dataset_copy / "val.txt").write_text(train[4] + "\n")  # also in train.txt
    with pytest.raises(SplitError, match="both train and val"):
        resolve_split(dataset_copy, find_samples(dataset_copy), seed=0, test_fraction=0.2)


def test_validation_gets_a_floor_where_the_folder_allows() -> None:
    from kvseg.data.splits import carve_validation

    ids = [f"id{i:03d}" for i in range(240)]
    train, val = carve_validation(ids, seed=0, fraction=0.15, minimum=50)
    assert len(val) == 50 and len(train) == 190 and not set(train) & set(val)  # 15% would be 36
    assert len(carve_validation(ids[:150], seed=0, fraction=0.15, minimum=50)[1]) == 22  # too few for the floor
    assert len(carve_validation(ids, seed=0, fraction=0.3, minimum=50)[1]) == 72  # the fraction wins when larger
