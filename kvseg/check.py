"""``python -m kvseg.check``: see :mod:`kvseg.data.check`."""

import sys

from kvseg.cli import run_cli
from kvseg.data.check import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
