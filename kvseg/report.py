"""``python -m kvseg.report``, as documented: the command :mod:`kvseg.commands.report`."""

import sys

from kvseg.cli import run_cli
from kvseg.commands.report import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
