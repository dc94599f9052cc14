
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kvseg.config import AugmentConfig
from kvseg.data.augment import build_eval_transform, build_train_transform
from kvseg.data.dataset import SegmentationDataset
from kvseg.data.folder import Sample
from kvseg.data.synthetic import write_synthetic_dataset


def _pattern(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric mask, and an image whose brightness is that mask (so alignment is visible)."""
    mask = np.zeros((size, size), np.uint8)
    mask[8:40, 10:20] = 1
    mask[30:36, 20:56] = 1
    image = np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8)
    return image, mask


def _unnormalise(image: torch.Tensor, cfg: AugmentConfig) -> np.ndarray:
    mean = torch.tensor(cfg.mean)[:, None, None]
    std = torch.tensor(cfg.std)[:, None, None]
    return ((image * std + mean) * 255).numpy().mean(axis=0)


@pytest.mark.parametrize("which", ["rotate", "rotate90", "hflip", "vflip", "transpose", "all"])
def test_image_and_mask_move_together_and_mask_stays_binary(which: str) -> None:
    probabilities = {"rotate_p": 0.0, "rotate90_p": 0.0, "hflip_p": 0.0, "vflip_p": 0.0, "transpose_p": 0.0}
    if which == "all":
        probabilities = {k: 1.0 for k in probabilities}
    else:
        probabilities[f"{which}_p"] = 1.0
    cfg = AugmentConfig(rotate_limit=40, **probabilities)
    transform = build_train_transform(cfg)
    image, mask = _pattern()
    changed = 0
    for seed in range(8):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        out_mask = np.asarray(out["mask"])
        assert set(np.unique(out_mask)) <= {0, 1}
        assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.float32
        bright = _unnormalise(out["image"], cfg) > 127
        disagreement = np.mean(bright != out_mask.astype(bool))
        assert disagreement < (0.02 if which in ("rotate", "all") else 1e-9)
        changed += not np.array_equal(out_mask, mask)
    assert changed >= 4  # the transform really does something


def test_eval_transform_is_deterministic() -> None:
    image, mask = _pattern()
    transform = build_eval_transform(AugmentConfig())
    first, second = transform(image=image, mask=mask), transform(image=image, mask=mask)
    assert torch.equal(first["image"], second["image"])
    assert np.array_equal(np.asarray(first["mask"]), mask)


@pytest.fixture(scope="module")
def same_image_dataset(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    """Eight samples that are all the same file: any difference in a batch comes from augmentation."""
    root = write_synthetic_dataset(tmp_path_factory.mktemp("one") / "d", num_images=2, size=64, seed=1)
    one = Sample("x", root / "images" / "synth0000.jpg", root / "masks" / "synth0000.png")
    return [one] * 8


def _epoch_batches(samples: list[Sample], epoch: int, seed: int = 0, workers: int = 2) -> list[torch.Tensor]:
    dataset = SegmentationDataset(samples, 64, build_train_transform(AugmentConfig()), seed=seed)
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=2, num_workers=workers)
    return [images for images, _, _ in loader]


def test_augmentation_differs_across_workers_and_epochs_and_repeats_for_a_seed(same_image_dataset: list[Sample]) -> None:
    epoch1 = _epoch_batches(same_image_dataset, epoch=1)
    # batches 0 and 1 come from different workers (round-robin); identical input files
    assert not torch.equal(epoch1[0], epoch1[1])
    epoch2 = _epoch_batches(same_image_dataset, epoch=2)
    assert not torch.equal(torch.cat(epoch1), torch.cat(epoch2))
    assert sum(torch.equal(a, b) for a, b in zip(epoch1, epoch2)) <= 1
    again = _epoch_batches(same_image_dataset, epoch=1, workers=0)
    assert all(torch.equal(a, b) for a, b in zip(epoch1, again))
    other_seed = _epoch_batches(same_image_dataset, epoch=1, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(epoch1, other_seed))


def test_transforms_decide_independently_of_each_other() -> None:
    cfg = AugmentConfig(rotate_p=0.0, rotate90_p=0.0, hflip_p=0.5, vflip_p=0.5, transpose_p=0.5)
    transform = build_train_transform(cfg)
    image = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[0, 1] = 1  # a single pixel: where it lands tells which flips were applied
    places = set()
    for seed in range(200):
        transform.set_random_seed(seed)
        out = np.asarray(transform(image=image, mask=mask)["mask"])
        places.add(tuple(np.argwhere(out)[0]))
    assert len(places) == 8  # every element of the flip/transpose group occurs


def test_photometric_and_scale_augmentations_keep_masks_binary_and_are_off_by_default() -> None:
    from kvseg.config import AugmentConfig, load_config
    from kvseg.data.augment import build_train_transform

    names = [type(t).__name__ for t in build_train_transform(AugmentConfig()).transforms]
    assert not {"Affine", "RandomBrightnessContrast", "HueSaturationValue", "GaussianBlur", "ImageCompression"} & set(names)
    cfg = load_config(overrides=["augment.scale_limit=0.3", "augment.scale_p=1", "augment.brightness_contrast_p=1",
                                 "augment.hue_saturation_p=1", "augment.blur_p=1", "augment.jpeg_p=1"]).augment
    transform = build_train_transform(cfg)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 1
    changed = 0
    for seed in range(6):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        assert set(np.unique(out["mask"])) <= {0, 1}
        changed += int(out["mask"].sum()) != int(mask.sum())  # scale moves the object's area
    assert changed >= 3


def test_augmentation_probabilities_are_checked() -> None:
    from kvseg.config import load_config
    from kvseg.errors import ConfigError

    with pytest.raises(ConfigError, match="augment.blur_p"):
        load_config(overrides=["augment.blur_p=1.5"])


def test_augmentations_the_device_path_lacks_keep_auto_in_the_workers() -> None:
    from kvseg.config import load_config
    from kvseg.errors import ConfigError
    from kvseg.runtime import resolve_augment_on

    with pytest.raises(ConfigError, match="augment.blur_p augment in the DataLoader workers only"):
        load_config(overrides=["data.augment_on=device", "augment.blur_p=0.2"])
    cfg = load_config(overrides=["augment.blur_p=0.2"])
    assert resolve_augment_on("auto", torch.device("cuda"), bool(cfg.augment.workers_only())) == "workers"
    assert resolve_augment_on("auto", torch.device("cuda")) == "device"
