"""``python -m kvseg.plan``, as documented: the command :mod:`kvseg.commands.plan`."""

import sys

from kvseg.cli import run_cli
from kvseg.commands.plan import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
