"""``python -m kvseg.preprocess``, as documented: the command :mod:`kvseg.commands.preprocess`."""

import sys

from kvseg.cli import run_cli
from kvseg.commands.preprocess import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
