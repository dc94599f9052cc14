"""``python -m kvseg.predict``, as documented: the command :mod:`kvseg.commands.predict`."""

import sys

from kvseg.cli import run_cli
from kvseg.commands.predict import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
