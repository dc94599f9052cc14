"""What every kvseg command shares: messages through :mod:`logging`, user errors as one line and exit status 2.

Library modules log through ``logging.getLogger(__name__)``; :func:`configure_logging` sends
those messages, as plain lines, to standard output of each machine's main process (local rank 0), so a
run of eight processes on one machine prints each line once and every machine's terminal shows its own
log. Warnings and errors of any rank go to standard error.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

from kvseg.errors import EXIT_PREEMPTED, KvsegError, Preempted, user_message


def is_main_rank() -> bool:
    """True in the process of global rank 0 (``RANK`` as torchrun and accelerate set it; 0 when unset)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


class _CurrentStream(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stdout`` / ``sys.stderr`` is at the time of each message
    (so that output captured or redirected after start-up still receives it)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property
    def stream(self):  # noqa: D102 - logging.StreamHandler's attribute
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def is_local_main() -> bool:
    """True in the main process of this machine: ``LOCAL_RANK`` 0 (``RANK`` 0 where only that is set; true when
    neither is)."""
    local = os.environ.get("LOCAL_RANK")
    return local.strip() in ("", "0") if local is not None else is_main_rank()


class _MainRankInfo(logging.Filter):
    """Lets INFO and DEBUG through in each machine's main process only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING and is_local_main()


def configure_logging(level: int = logging.INFO) -> None:
    """Print kvseg's messages as the commands do: INFO lines on stdout (local main process), warnings on stderr (every rank).

    Idempotent: calling it again replaces the handlers it installed before.
    """
    logger = logging.getLogger("kvseg")
    for handler in [h for h in logger.handlers if getattr(h, "_kvseg", False)]:
        logger.removeHandler(handler)
    info = _CurrentStream("stdout")
    info.addFilter(_MainRankInfo())
    warnings = _CurrentStream("stderr")
    warnings.setLevel(logging.WARNING)
    for handler in (info, warnings):
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._kvseg = True
        logger.addHandler(handler)
    logger.setLevel(level)  # records still propagate: a host application's or pytest's root handlers see them too


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; print a :class:`KvsegError` as ``error: <message>`` and return 2, a
    :class:`~kvseg.errors.Preempted` stop as ``preempted: <message>`` and return 75 (:data:`EXIT_PREEMPTED`).

    With ``--debug`` among the arguments an error propagates with its traceback. In a
    multi-process launch the main process of each machine prints (each machine has its own terminal).
    """
    configure_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    local_main = os.environ.get("LOCAL_RANK", "0").strip() in ("", "0")
    try:
        main(args)
    except KvsegError as exc:
        if "--debug" in args:
            raise
        if local_main:
            print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    except Preempted as exc:
        if local_main:
            print(f"preempted: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
