"""``python -m kvseg.check``, as documented: the command :mod:`kvseg.commands.check`."""

import sys

from kvseg.cli import run_cli
from kvseg.commands.check import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
