"""The command lines: each module parses its arguments and calls one library function.

``train`` (``train_ddp.py``), ``export`` (``export.py``), ``benchmark`` (``benchmark.py``),
``predict``, ``check`` and ``report``; ``kvseg <command>`` (:mod:`kvseg.__main__`) reaches each.
The top of the import graph: no stage imports a command.

May import: every stage and the base modules.
"""
