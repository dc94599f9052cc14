"""Evaluation: scoring a logits function on a split, test-time augmentation, and a run's report.

``metrics`` (confusion counts, per-image and dataset-level scores, AP, ROC AUC), ``evaluate`` (the one
evaluation path, whatever produces the logits), ``tta``, ``datasets`` (a run's splits through the eval
pipeline), ``overlay`` (a mask drawn over its image, OpenCV only), ``plots`` and ``report`` (the
figures and index.html; the only modules that load matplotlib).

May import: :mod:`kvseg.runs`, :mod:`kvseg.data`, :mod:`kvseg.models` and the base modules.
"""
