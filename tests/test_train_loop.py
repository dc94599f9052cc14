"""A plain-PyTorch training loop over kvseg's parts: the pieces fit together and learn."""

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kvseg.augment import build_eval_transform, build_train_transform
from kvseg.config import AugmentConfig
from kvseg.data import SegmentationDataset, find_samples, resolve_split
from kvseg.metrics import SegmentationMetrics
from kvseg.model import UNet


def _evaluate(model: UNet, loader: DataLoader) -> dict:
    model.eval()
    metrics = SegmentationMetrics()
    with torch.no_grad():
        for images, masks, _ in loader:
            metrics.update(model(images), masks)
    return metrics.compute()


def test_loss_falls_and_iou_rises(synthetic_root: Path) -> None:
    torch.manual_seed(0)
    samples = find_samples(synthetic_root)
    split = resolve_split(synthetic_root, samples, seed=0, test_fraction=0.2)
    cfg = AugmentConfig()
    train_set = SegmentationDataset([samples[i] for i in split.train], 64, build_train_transform(cfg), cache=True)
    test_set = SegmentationDataset([samples[i] for i in split.test], 64, build_eval_transform(cfg), cache=True)
    train_loader = DataLoader(train_set, batch_size=4, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=8)
    model = UNet(base_channels=8, depth=3)
    untrained = _evaluate(model, test_loader)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    epoch_losses = []
    for epoch in range(14):
        train_set.set_epoch(epoch)
        model.train()
        total = 0.0
        for images, masks, _ in train_loader:
            loss = loss_fn(model(images), masks.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(images)
        epoch_losses.append(total / len(train_set))
    trained = _evaluate(model, test_loader)
    assert epoch_losses[-1] < 0.5 * epoch_losses[0]
    assert trained["loss"] < untrained["loss"]
    assert trained["per_image"]["iou"] > untrained["per_image"]["iou"] + 0.3
    assert trained["per_image"]["iou"] > 0.5
