"""The plan: the configuration a time budget can train far enough on this folder and machine, with its reasons.

nnU-Net plans patch size, batch and topology from the dataset fingerprint and the GPU's memory, then
trains a fixed 1000 epochs. kvseg plans by time: from the fingerprint (:mod:`kvseg.planning.fingerprint`)
and the probe's images/s (:mod:`kvseg.planning.probe`) it predicts, for each candidate image size and
width, how many optimizer steps the budget holds, then

1. takes the smallest image size at which a small object (the 5th percentile of the foreground) is
   still :data:`MIN_OBJECT_PIXELS` across — larger sizes cost the square of the side and, on the
   development folder, bought nothing at equal epochs (docs/training.md);
2. takes the widest U-Net that still trains :data:`TARGET_STEPS` steps at that size (width bought
   Dice per epoch on the development folder; steps are what a from-scratch U-Net needs first);
3. goes one image size up when the budget holds twice the target steps at the widest width.

The remaining choices are the real-frames recipe's (BCE + Dice, warm-up then cosine over the budget,
bilinear upsampling, the study's augmentations), chosen by experiment on validation scores only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvseg.planning.fingerprint import Fingerprint
from kvseg.planning.probe import Probe

SIZES = (128, 160, 192, 224, 256, 320, 384, 448, 512)
WIDTHS = (16, 24, 32)
MIN_OBJECT_PIXELS = 12.0
TARGET_STEPS = 2500  # where the development folder's learning curve levels off (about 0.85 test Dice, 2,400 steps)
BATCH_SIZE = 8
EVAL_SPEEDUP = 3.0  # a validation image costs about a third of a training image (forward only)
EPOCH_OVERHEAD_S = 0.5  # checkpoints and state written after every epoch
RECIPE = {  # the real-frames recipe (configs/real_cpu.yaml), kept by the plan
    "model.depth": 4, "model.upsample": "bilinear", "train.optimizer": "adam", "train.lr": 1e-3,
    "train.scheduler": "warmup_cosine", "train.warmup_epochs": 3, "train.loss": "bce+dice", "train.select_metric": "dice",
    "augment.rotate_limit": 45.0, "augment.rotate_p": 0.5, "augment.rotate90_p": 0.0, "augment.hflip_p": 0.5,
    "augment.vflip_p": 0.5, "augment.transpose_p": 0.5,
}


def candidate_sizes(fingerprint: Fingerprint) -> list[int]:
    """The image sizes worth probing: up to the folder's median short side (no upscaling), at least the smallest."""
    sizes = [s for s in SIZES if s <= max(fingerprint.short_side, SIZES[0])]
    return sizes or [SIZES[0]]


@dataclass
class Estimate:
    """What a candidate costs and how far the budget takes it."""

    image_size: int
    base_channels: int
    layout: str
    images_per_s: float
    epoch_seconds: float
    epochs: float
    steps: int


@dataclass
class Plan:
    """The chosen values (config keys), why each was chosen, and every candidate's estimate."""

    values: dict[str, object]
    reasons: dict[str, str]
    estimates: list[Estimate]
    fingerprint: Fingerprint
    probe: Probe
    budget_minutes: float
    notes: list[str] = field(default_factory=list)

    @property
    def overrides(self) -> list[str]:
        """The plan as ``key=value`` overrides for :func:`kvseg.config.load_config`."""
        return [f"{key}={_yaml_value(value)}" for key, value in self.values.items()]

    def to_yaml(self) -> str:
        """A config file with a comment on every value saying why, and the probe table above it."""
        lines = ["# kvseg plan (python -m kvseg.plan): the configuration this budget can train far enough on this",
                 "# folder and machine. Train with: accelerate launch train_ddp.py --config THIS_FILE --data-dir DIR", "#"]
        lines += [f"# {line}" for line in self.fingerprint.lines()]
        probe = self.probe
        lines += [f"# probe: {probe.device}, {len(probe.measurements)} measurements in {probe.seconds:.0f} s, "
                  f"precision {probe.precision}, {probe.threads} thread(s); images/s of a training step (batch 4):",
                  "#   size  width  layout          images/s  epoch s  epochs in budget  steps"]
        for e in sorted(self.estimates, key=lambda e: (e.image_size, e.base_channels)):
            lines.append(f"#   {e.image_size:4d}  {e.base_channels:5d}  {e.layout:<14}  {e.images_per_s:8.1f}  "
                         f"{e.epoch_seconds:7.1f}  {e.epochs:16.1f}  {e.steps:5d}")
        if probe.not_probed:
            lines.append("#   not probed (the probe's time ran out): "
                         + ", ".join(f"{s} px / base {w}" for s, w in probe.not_probed))
        lines += [f"# note: {note}" for note in self.notes]
        sections: dict[str, list[str]] = {}
        for key, value in self.values.items():
            section, name = key.split(".", 1)
            reason = self.reasons.get(key, "")
            sections.setdefault(section, []).append(f"  {name}: {_yaml_value(value)}" + (f"  # {reason}" if reason else ""))
        for section in ("data", "augment", "model", "train"):
            if section in sections:
                lines += [f"{section}:", *sections[section]]
        return "\n".join(lines) + "\n"


def _yaml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def estimate(fingerprint: Fingerprint, probe: Probe, budget_minutes: float) -> list[Estimate]:
    """Epoch seconds, epochs and steps within ``budget_minutes`` of every probed candidate."""
    rows = []
    steps_per_epoch = max(1, math.ceil(fingerprint.train / BATCH_SIZE))
    for size, width in sorted({(m.image_size, m.base_channels) for m in probe.measurements}):
        best = probe.best(size, width)
        if best is None:
            continue
        epoch = (fingerprint.train / best.images_per_s + fingerprint.val / (best.images_per_s * EVAL_SPEEDUP)
                 + EPOCH_OVERHEAD_S)
        epochs = 60.0 * budget_minutes / epoch
        rows.append(Estimate(size, width, best.layout, best.images_per_s, epoch, epochs, int(epochs * steps_per_epoch)))
    return rows


def make_plan(fingerprint: Fingerprint, probe: Probe, budget_minutes: float) -> Plan:
    """Choose image size, width, layout and threads for ``budget_minutes`` (see the module docstring).

    Raises:
        ValueError: the probe measured no candidate.
    """
    estimates = estimate(fingerprint, probe, budget_minutes)
    if not estimates:
        raise ValueError("the probe measured no candidate")
    by_key = {(e.image_size, e.base_channels): e for e in estimates}
    sizes = sorted({e.image_size for e in estimates})
    reasons, notes = {}, []
    size = next((s for s in sizes if fingerprint.object_pixels(s) >= MIN_OBJECT_PIXELS), sizes[-1])
    reasons["data.image_size"] = (f"a 5th-percentile object is {fingerprint.object_pixels(size):.0f} px across here "
                                  f"(at least {MIN_OBJECT_PIXELS:.0f} wanted)")

    def widest(at: int) -> Estimate | None:
        fits = [e for e in estimates if e.image_size == at and e.steps >= TARGET_STEPS]
        return max(fits, key=lambda e: e.base_channels, default=None)

    chosen = widest(size)
    if chosen is not None and chosen.base_channels == max(WIDTHS) and chosen.steps >= 2 * TARGET_STEPS:
        larger = [s for s in sizes if s > size]
        if larger and widest(larger[0]) is not None:
            chosen = widest(larger[0])
            reasons["data.image_size"] = (f"one size up: the budget holds {by_key[(size, max(WIDTHS))].steps} steps "
                                          f"at {size} px and base {max(WIDTHS)}, twice the {TARGET_STEPS} wanted")
    if chosen is None:
        chosen = min((e for e in estimates if e.image_size == size), key=lambda e: e.base_channels * 1.0 / e.images_per_s,
                     default=min(estimates, key=lambda e: 1.0 / e.images_per_s))
        notes.append(f"the budget trains only about {chosen.steps} steps even at base {chosen.base_channels} "
                     f"(about {TARGET_STEPS} bring a from-scratch U-Net near its plateau): expect a lower score, or "
                     f"give about {math.ceil(budget_minutes * TARGET_STEPS / max(chosen.steps, 1))} minutes")
        reasons["model.base_channels"] = f"the cheapest width: the budget is short ({chosen.steps} steps expected)"
    else:
        reasons["model.base_channels"] = (f"the widest U-Net that trains {TARGET_STEPS}+ steps in the budget "
                                          f"({chosen.steps} expected, {chosen.epochs:.0f} epochs)")
    other = [m for m in probe.measurements if (m.image_size, m.base_channels, m.precision, m.threads)
             == (chosen.image_size, chosen.base_channels, probe.precision, probe.threads) and m.layout != chosen.layout]
    ratio = f"{chosen.images_per_s / other[0].images_per_s:.2f}x {other[0].layout}" if other else "the only one probed"
    values: dict[str, object] = {
        "data.image_size": chosen.image_size,
        "model.base_channels": chosen.base_channels,
        **{k: v for k, v in RECIPE.items() if k.startswith("model.")},
        "train.budget_minutes": budget_minutes,
        "train.epochs": max(10, math.ceil(2 * chosen.epochs)),
        "train.batch_size": BATCH_SIZE,
        **{k: v for k, v in RECIPE.items() if k.startswith("train.")},
        "train.channels_last": chosen.layout == "channels_last",
        "train.cpu_threads": probe.threads if probe.device == "cpu" else 0,
        **{k: v for k, v in RECIPE.items() if k.startswith("augment.")},
    }
    reasons.update({
        "model.upsample": "the recipe's: bilinear upsampling (transposed convolutions made no difference beyond noise)",
        "train.budget_minutes": "training + validation minutes; the schedule anneals to the end of them",
        "train.epochs": f"an upper bound; about {chosen.epochs:.0f} epochs are expected to fit in the budget",
        "train.batch_size": "per process; the recipe's",
        "train.loss": "the recipe's: the Dice term bought the most on the development folder (BCE alone -0.10)",
        "train.scheduler": "warm-up, then cosine to the end of the budget: the last weights are annealed",
        "train.channels_last": f"probe: {chosen.layout} at this size and width, {ratio}",
        "train.cpu_threads": (f"probe: {probe.threads} thread(s) per process was the faster" if probe.device == "cpu"
                              else "not used on a GPU"),
    })
    for key in RECIPE:
        reasons.setdefault(key, "the real-frames recipe's (configs/real_cpu.yaml, docs/training.md)")
    if probe.device == "cpu" and probe.native_bf16 and probe.precision == "no":
        notes.append("fp32 trains faster here than bf16 autocast, which kvseg's auto picks on this CPU: train with "
                     "--mixed-precision no (train_ddp.py --plan auto does)")
    return Plan(values, reasons, estimates, fingerprint, probe, budget_minutes, notes)
