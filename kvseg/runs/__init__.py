"""Runs: the run folder (every file name in it, locking, resume state) and self-describing model checkpoints.

Below evaluation, training and deploy because all three read run folders and training writes them.

May import: :mod:`kvseg.data` (a run's split), :mod:`kvseg.models` (a checkpoint's model), and the base
modules (:mod:`kvseg.errors`, :mod:`kvseg.config`, :mod:`kvseg.files`).
"""
