"""Bench: what ``benchmark.py`` measures: latency and parity per backend (``run``), training speed
(``training``), data loading (``loader``), video end to end (``video``), and the Markdown report (``report``).

May import every stage below it: :mod:`kvseg.training`, :mod:`kvseg.deploy`, :mod:`kvseg.video`,
:mod:`kvseg.evaluation`, :mod:`kvseg.runs`, :mod:`kvseg.data`, :mod:`kvseg.models` and the base modules.
"""
