"""A memory allocator that keeps large tensor buffers, chosen before anything else is imported.

Training frees and re-allocates the same large activation buffers every step. glibc's malloc serves
every block over its mmap threshold (at most 32 MiB on 64-bit Linux) with a fresh ``mmap`` and returns
it with ``munmap``, so each step faults every page of those buffers in again. A caching allocator
(tcmalloc, as in Intel's ``ipexrun`` launcher and PyTorch's CPU performance guide), or glibc told
never to return memory, keeps them. An allocator can only be chosen when a process starts, so the
entry points call :func:`reexec_with_allocator` first: the process replaces itself once (``execv``,
same PID, same arguments and environment) with the allocator set.

``KVSEG_ALLOCATOR`` picks it: ``auto`` (default: tcmalloc when found, otherwise glibc tuned),
``tcmalloc``, ``glibc`` or ``off``. This module imports nothing heavy: it runs before torch loads.

OpenVINO's CPU plugin crashes in a process with a preloaded tcmalloc or jemalloc ("free(): invalid
pointer", segmentation faults; openvinotoolkit/openvino#28551 and #29025, seen here with OpenVINO
2025 and libtcmalloc-minimal4): an entry point that will load it asks :func:`reexec_with_allocator`
to leave tcmalloc out under ``auto``, and :func:`preloaded_malloc` lets the backend refuse to start
under one that was preloaded anyway.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "KVSEG_ALLOCATOR"
DONE = "KVSEG_ALLOCATOR_ACTIVE"  # set in the re-executed process: what was chosen
CHOICES = ("auto", "tcmalloc", "glibc", "off")
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# glibc (mallopt via environment, read at process start): serve large blocks from the heap instead of
# mmap, and keep freed memory for the next step instead of trimming it (see mallopt(3)).
GLIBC_TUNING = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30), "MALLOC_TOP_PAD_": str(2**30)}


def find_tcmalloc() -> Path | None:
    """The tcmalloc shared library on this machine (system or conda prefix), or None."""
    prefixes = [os.environ.get("CONDA_PREFIX"), sys.prefix]
    folders = [Path(p) / "lib" for p in prefixes if p] + [Path(d) for d in LIBRARY_DIRS]
    for folder in folders:
        for name in TCMALLOC_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def allocator_environment(choice: str, environ: dict[str, str]) -> tuple[dict[str, str], str]:
    """The environment to re-execute with for ``choice``, and a one-line description of what it sets.

    Raises:
        ValueError: an unknown choice, or ``tcmalloc`` asked for but not installed.
    """
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}; expected one of {', '.join(CHOICES)}")
    env = dict(environ)
    library = find_tcmalloc() if choice in ("auto", "tcmalloc") else None
    if choice == "tcmalloc" and library is None:
        raise ValueError(f"{ENV}=tcmalloc but no tcmalloc library was found; install it (Debian/Ubuntu: "
                         "apt install libtcmalloc-minimal4; conda: conda install gperftools)")
    if library is not None:
        env["LD_PRELOAD"] = ":".join(p for p in (str(library), environ.get("LD_PRELOAD", "")) if p)
        description = f"tcmalloc ({library})"
    else:
        env.update({k: environ.get(k, v) for k, v in GLIBC_TUNING.items()})
        description = "glibc malloc without mmap for large blocks"
    env[DONE] = description
    return env, description


def preloaded_malloc(environ: dict[str, str] | None = None) -> str | None:
    """The replacement malloc (tcmalloc, jemalloc, mimalloc) in ``LD_PRELOAD``, or None."""
    preload = (os.environ if environ is None else environ).get("LD_PRELOAD", "")
    return next((entry for entry in preload.replace(" ", ":").split(":")
                 if any(name in Path(entry).name for name in ("tcmalloc", "jemalloc", "mimalloc"))), None)


def benchmark_times_openvino(argv: list[str]) -> bool:
    """Whether a benchmark command line asks for an OpenVINO backend (the default list has them), read before argparse runs."""
    for i, arg in enumerate(argv):
        if arg.startswith("--backends"):
            value = arg.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            return "ov-" in value
    return True


def reexec_with_allocator(without_tcmalloc: str = "") -> None:
    """Replace this process once with itself under the allocator ``KVSEG_ALLOCATOR`` asks for (Linux only).

    Does nothing when it already ran, when the choice is ``off``, or off Linux. An unknown choice
    or a missing tcmalloc ends the process with a one-line error and exit status 2. With ``auto``
    and no tcmalloc, the first process of a launch prints a one-line note (on stdout) saying how to get it.
    ``without_tcmalloc``, when given, is why ``auto`` must use glibc here (printed in the note).
    """
    choice = os.environ.get(ENV) or "auto"  # set but empty: the default
    if DONE in os.environ or choice == "off" or not sys.platform.startswith("linux"):
        return
    if choice == "auto" and without_tcmalloc:
        choice = "glibc"
        print(f"note: {without_tcmalloc}; using glibc malloc tuned for large tensors instead of tcmalloc")
    try:
        env, description = allocator_environment(choice, dict(os.environ))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if (os.environ.get(ENV) or "auto") == "auto" and not without_tcmalloc and not description.startswith("tcmalloc"):
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("RANK", "0") == "0":
            print("note: tcmalloc not found; using glibc malloc tuned for large tensors "
                  "(for tcmalloc: apt install libtcmalloc-minimal4, or conda install gperftools)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
