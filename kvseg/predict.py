"""``python -m kvseg.predict``: see :mod:`kvseg.deploy.predict`."""

import sys

from kvseg.cli import run_cli
from kvseg.deploy.predict import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
