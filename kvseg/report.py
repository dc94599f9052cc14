"""``python -m kvseg.report``: see :mod:`kvseg.evaluation.report`."""

import sys

from kvseg.cli import run_cli
from kvseg.evaluation.report import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
