"""Run by tests/test_distributed_eval.py under ``accelerate launch`` with two CPU processes (not a test module itself).

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml tests/two_processes_evaluate.py OUT.json 32 64

For each image size, 11 images in batches of 2 per process (the last global batch has 3 images,
so accelerate pads one process with a duplicate) are scored three ways: kvseg's evaluation, which
moves per-image counts and one histogram; the path it replaced, which all-gathered the logits,
masks, indices and losses of every batch (kept here as the reference); and one process alone over
the whole split. The bytes each process hands to a collective are counted per call. Then one
training epoch with a learning rate of 0 gives the loss that must count every image once. Rank 0
writes what it saw to OUT.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kvseg.evaluation.evaluate import evaluate, per_image_loss
from kvseg.evaluation.metrics import SegmentationMetrics
from kvseg.training.train import train_one_epoch

IMAGES, BATCH = 11, 2


class Split(Dataset):
    """Fixed tensors as ``(images, masks, index)``; ``samples[i].id`` names each, as evaluate reads them."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.masks = images, masks
        self.samples = [type("Sample", (), {"id": f"img{i:02d}"})() for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.masks[index], index


def nbytes(data) -> int:
    if isinstance(data, torch.Tensor):
        return data.numel() * data.element_size()
    return sum(nbytes(item) for item in data)


class Counting:
    """The accelerator, counting the bytes this process hands to each collective."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator, self.process_index, self.calls = accelerator, accelerator.process_index, []

    def gather_for_metrics(self, data):
        self.calls.append(("gather", nbytes(data)))
        return self.accelerator.gather_for_metrics(data)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        self.calls.append(("reduce", nbytes(tensor)))
        return self.accelerator.reduce(tensor, reduction=reduction)


def gathered_logits(processes: Counting, loader, loss_fn) -> tuple[SegmentationMetrics, list[int]]:
    """The path kvseg's evaluation replaced: every batch's logits, masks, indices and losses all-gathered."""
    metrics, indices = SegmentationMetrics(), []
    for logits, masks, index in loader:
        losses = per_image_loss(loss_fn, logits, masks)
        logits, masks, index, losses = processes.gather_for_metrics((logits.contiguous(), masks, index, losses))
        metrics.update(logits, masks, losses)
        indices += index.tolist()
    return metrics, indices


def split_of(size: int, seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(IMAGES, 1, size, size, generator=generator) * 3
    masks = (torch.rand(IMAGES, 1, size, size, generator=generator) < torch.sigmoid(logits / 2)).to(torch.uint8)
    masks[3] = 0  # an empty mask among them
    return Split(logits, masks)


def main(out: str, sizes: list[int]) -> None:
    accelerator = Accelerator(cpu=True)
    loss_fn = nn.BCEWithLogitsLoss()
    report = {"processes": accelerator.num_processes, "sizes": {}}
    for size in sizes:
        split = split_of(size, seed=size)
        sharded = accelerator.prepare_data_loader(DataLoader(split, batch_size=BATCH))
        counts = Counting(accelerator)
        result = evaluate(lambda x: x, sharded, loss_fn=loss_fn, loss_name="bce", processes=counts)
        logits = Counting(accelerator)
        reference, indices = gathered_logits(logits, sharded, loss_fn)
        alone = evaluate(lambda x: x, DataLoader(split, batch_size=BATCH), loss_fn=loss_fn, loss_name="bce")
        ap, auc = reference.ranking()
        report["sizes"][size] = {
            "result": result.to_json(), "alone": alone.to_json(),
            "reference": {"ids": [split.samples[i].id for i in indices], "confusion_matrix": asdict(reference.confusion_matrix()),
                          "iou": reference.per_image()["iou"].tolist(), "dice": reference.per_image()["dice"].tolist(),
                          "loss": reference.losses().tolist(), "average_precision": ap, "roc_auc": auc},
            "counts_calls": counts.calls, "logits_calls": logits.calls, "batches": len(sharded),
        }
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(IMAGES, 3, 16, 16, generator=generator)
    masks = (torch.rand(IMAGES, 1, 16, 16, generator=generator) < 0.3).to(torch.uint8)
    model = nn.Conv2d(3, 1, 1)  # no BatchNorm: each image's loss does not depend on its batch
    torch.manual_seed(0)
    nn.init.normal_(model.weight)
    with torch.no_grad():
        expected = per_image_loss(loss_fn, model(images), masks).double().mean().item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(Split(images, masks), batch_size=BATCH))
    stats = train_one_epoch(model, loader, optimizer, loss_fn, accelerator, channels_last=False)
    report["train"] = {"loss": stats.loss, "images": stats.images, "expected": expected,
                       "trained": len(loader) * BATCH * accelerator.num_processes}
    if accelerator.is_main_process:
        with open(out, "w") as handle:
            json.dump(report, handle)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], [int(v) for v in sys.argv[2:]])
