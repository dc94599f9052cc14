"""Planning: fit a run to the folder and the machine, by time.

``fingerprint`` reads what the folder check found (count, sizes, foreground fraction and object size);
``probe`` measures training steps on this machine for candidate image sizes, widths, memory layouts
and thread counts (about 30 s); ``planner`` picks the configuration that the time budget can train
far enough and writes it as a config file that says why each value was chosen.
``python -m kvseg.plan`` and ``train_ddp.py --plan auto`` use it.

May import: :mod:`kvseg.training`, :mod:`kvseg.data`, :mod:`kvseg.models` and the base modules.
"""
