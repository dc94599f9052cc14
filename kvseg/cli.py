"""Shared command-line behaviour: user errors become one line and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from kvseg.errors import KvsegError


def user_message(exc: KvsegError) -> str:
    """The one-line message of ``exc``.

    An error raised in a DataLoader worker reaches the main process re-wrapped with the worker's
    traceback in its message; its own message is the last line, after the class name.
    """
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; print a :class:`KvsegError` as ``error: <message>`` and return 2.

    With ``--debug`` among the arguments the error propagates with its traceback. In a
    multi-process launch the main process of each machine prints (each machine has its own terminal).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        main(args)
    except KvsegError as exc:
        if "--debug" in args:
            raise
        from accelerate import PartialState

        if PartialState().is_local_main_process:
            print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    return 0
