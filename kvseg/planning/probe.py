"""Probe this machine: images/s of a training step for candidate image sizes and widths, layouts, threads, precision.

Each measurement times the step a run takes — the U-Net, BCE + Dice, backward, Adam — on random
tensors (the loader is not in it: on a CPU it delivers several times what a step consumes, see
``benchmark.py``), after one untimed step, for at least two steps and about a second. Precision and
thread count are measured first, at the cheapest candidate; the memory layout is measured at every
candidate, since which one is faster flips with the size of the tensors (channels_last was +10% for a
base-16 U-Net at 128 px and -26% for base 32 at 256 px on an AVX2 CPU). Candidates run cheapest first
until the probe's time is spent; the rest are reported as not probed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from kvseg.config import ModelConfig, TrainConfig
from kvseg.models.losses import build_loss
from kvseg.models.unet import build_model
from kvseg.runtime import cpu_supports_bf16, usable_cores

PROBE_BATCH = 4
MIN_STEPS, MIN_SECONDS = 2, 1.0


@dataclass(frozen=True)
class Measurement:
    """Images/s of one training step setting (``layout``: ``channels_last`` or ``nchw``)."""

    image_size: int
    base_channels: int
    layout: str
    precision: str
    threads: int
    images_per_s: float
    steps: int


@dataclass
class Probe:
    """Every measurement, the precision and threads chosen, and the candidates the time did not reach."""

    device: str
    precision: str
    threads: int
    measurements: list[Measurement] = field(default_factory=list)
    not_probed: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0
    native_bf16: bool = False  # the CPU runs bf16 natively (so kvseg's auto precision picks bf16)

    def best(self, image_size: int, base_channels: int) -> Measurement | None:
        """The faster layout of a candidate at the chosen precision and threads, or None when not probed."""
        rows = [m for m in self.measurements if (m.image_size, m.base_channels, m.precision, m.threads)
                == (image_size, base_channels, self.precision, self.threads)]
        return max(rows, key=lambda m: m.images_per_s, default=None)

    def to_json(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure(image_size: int, base_channels: int, layout: str, precision: str, threads: int, device: str = "cpu",
            depth: int = 4, batch: int = PROBE_BATCH) -> Measurement:
    """Images/s of training steps of a base-``base_channels`` U-Net at ``image_size`` (see the module docstring)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_channels=base_channels, depth=depth, upsample="bilinear")).to(device).train()
    memory = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = build_loss(TrainConfig(loss="bce+dice"))
    images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=memory)
    masks = (torch.rand(batch, 1, image_size, image_size, device=device) > 0.8).float()
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            logits = model(images)
        loss = loss_fn(logits.float(), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    with _threads(threads):
        step()  # untimed: first-call allocations and kernel selection
        steps, start = 0, time.perf_counter()
        while steps < MIN_STEPS or time.perf_counter() - start < MIN_SECONDS:
            step()
            steps += 1
        seconds = time.perf_counter() - start
    return Measurement(image_size, base_channels, layout, precision, threads, steps * batch / seconds, steps)


def probe(candidates: Sequence[tuple[int, int]], seconds: float = 30.0, device: str | None = None) -> Probe:
    """Measure ``candidates`` ((image size, base width), any order) within about ``seconds``.

    On a CPU, bf16 autocast is measured against fp32 where the CPU runs bf16 natively, and one thread
    per usable core against half as many; on a GPU, bf16 where supported, all of it. The faster is kept.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ordered = sorted(candidates, key=lambda c: c[0] ** 2 * c[1])
    started = time.perf_counter()
    cores = usable_cores()
    cheapest = ordered[0]
    result = Probe(device, "no", cores, native_bf16=device == "cpu" and cpu_supports_bf16())
    if device == "cpu":
        precisions = ["no", "bf16"] if cpu_supports_bf16() else ["no"]
        thread_counts = [cores] + ([cores // 2] if cores > 1 else [])
    else:
        precisions = ["bf16"] if torch.cuda.is_bf16_supported() else ["no"]
        thread_counts = [cores]
    trials = [measure(*cheapest, "channels_last", p, cores, device) for p in precisions]
    result.measurements += trials
    result.precision = max(trials, key=lambda m: m.images_per_s).precision
    trials = [next(m for m in result.measurements if m.precision == result.precision)]
    trials += [measure(*cheapest, "channels_last", result.precision, t, device) for t in thread_counts[1:]]
    result.measurements += trials[1:]
    result.threads = max(trials, key=lambda m: m.images_per_s).threads
    for index, (size, width) in enumerate(ordered):
        if index and time.perf_counter() - started > seconds:  # the cheapest candidate is always measured
            result.not_probed.append((size, width))
            continue
        for layout in ("channels_last", "nchw"):
            if not any((m.image_size, m.base_channels, m.layout, m.precision, m.threads)
                       == (size, width, layout, result.precision, result.threads) for m in result.measurements):
                result.measurements.append(measure(size, width, layout, result.precision, result.threads, device))
    result.seconds = time.perf_counter() - started
    return result
