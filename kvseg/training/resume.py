"""What a resumed run may change, and what it may not.

``--resume RUN`` (or ``--resume auto``) starts from the run's own config.yaml; the command's flags and
``--set`` change it. The learning-rate schedule follows the run's progress (steps over the step limit,
or the budget spent: :class:`kvseg.training.optim.ProgressSchedule`), so a longer or shorter run, a
new budget or learning rate continues from the step reached along the schedule of the new length:
it anneals to the new end and does not climb back. What the saved state and the split were made for
cannot change (:data:`FIXED`), nor, when a preemption stopped the run inside an epoch, what decides
the order and size of that epoch's batches (:data:`FIXED_WITHIN_EPOCH`). The changes that are
allowed are written into the run's config.yaml and said in one log line.
"""

from __future__ import annotations

from kvseg.config import Config, config_to_dict, load_config
from kvseg.errors import CheckpointError
from kvseg.runs.folder import Progress, RunDir

# Key prefixes a resumed run cannot change, and why (what depends on them).
FIXED = {
    "model.": "the saved weights have that shape",
    "data.image_size": "the run trains and is scored at that size",
    "data.mask_encoding": "the masks would mean something else than what was learnt",
    "data.split_seed": "the split is fixed in the run's train.txt, val.txt and test.txt",
    "data.test_fraction": "the split is fixed in the run's train.txt, val.txt and test.txt",
    "data.val_fraction": "the split is fixed in the run's train.txt, val.txt and test.txt",
    "data.val_min_images": "the split is fixed in the run's train.txt, val.txt and test.txt",
    "data.synthetic_": "the data is the folder the run was started on",
    "train.optimizer": "the saved optimizer state is that optimizer's",
}
FIXED_WITHIN_EPOCH = {
    "train.batch_size": "the preempted epoch goes on from its next batch, in batches of that size",
    "train.grad_accum_steps": "the preempted epoch goes on from its next optimizer step, of that many batches",
    "train.seed": "the preempted epoch goes on in the order that seed drew",
}


def config_changes(previous: Config, cfg: Config) -> dict[str, tuple]:
    """``section.key: (before, now)`` for every config field whose value differs (the run folder's place aside)."""
    def flat(config: Config) -> dict:
        return {f"{section}.{key}": value for section, values in config_to_dict(config).items() if isinstance(values, dict)
                for key, value in values.items()}

    before, now = flat(previous), flat(cfg)
    return {key: (before.get(key), value) for key, value in now.items() if before.get(key) != value}


def resume_config(run: RunDir, cfg: Config, progress: Progress) -> dict[str, tuple]:
    """Check that ``cfg`` can continue ``run`` from the state saved with ``progress``; return its changes.

    Returns:
        ``section.key: (before, now)`` for each key ``cfg`` changes (:func:`config_changes`).

    Raises:
        CheckpointError: one line naming the first key that cannot change, both values and why.
    """
    changes = config_changes(load_config(run.config), cfg)
    fixed = {**FIXED, **(FIXED_WITHIN_EPOCH if progress.partial else {})}
    before, now = changes.get("train.ema_decay", (cfg.train.ema_decay,) * 2)
    if (before > 0) != (now > 0):
        raise CheckpointError(f"{run}: cannot resume with train.ema_decay={now} (the run has {before}): the saved "
                              f"state {'has' if before > 0 else 'has no'} average of the weights; start a new run instead")
    for key, (before, now) in changes.items():
        why = next((reason for prefix, reason in fixed.items() if key.startswith(prefix)), None)
        if why:
            raise CheckpointError(f"{run}: cannot resume with {key}={now} (the run has {before}): {why}; "
                                  "start a new run (another --run-name) instead")
    return changes


def describe(changes: dict[str, tuple]) -> str:
    """``train.epochs 2 -> 4, train.lr 0.003 -> 0.001``: the changes of a resumed run, for its log line."""
    return ", ".join(f"{key} {before} -> {now}" for key, (before, now) in changes.items())
