"""Download the wheels kvseg needs on a GPU machine that has PyTorch but no network, and check them.

    python benchmarks/gpu_wheels.py WHEELS_DIR [--python-version 3.11] [--platform TAG ...]
    python benchmarks/gpu_wheels.py WHEELS_DIR --check-only      # a folder downloaded before
    python benchmarks/gpu_wheels.py --write-lock                  # after changing the list: its declared requirements

then, on the GPU machine, in the repository (WHEELS_DIR copied there):

    pip install --no-index --find-links WHEELS_DIR -e .

The wheels are the pinned list in benchmarks/gpu_wheels.txt, downloaded with ``pip download
--no-deps --only-binary=:all:`` for the target Python and platform: pip cannot leave out what the
machine already has (torch and its CUDA libraries, gigabytes), so the list is explicit. After the
download every ``Requires-Dist`` in the wheels' METADATA (markers evaluated for the target) must be
in the list or in PROVIDED; the command fails naming what is missing. The default platforms are the
manylinux tags up to glibc 2.28 for x86_64: several wheels (onnxruntime-gpu, scipy, opencv, pillow)
are only built for manylinux_2_27/2_28, so ``--platform manylinux2014_x86_64`` alone finds none.

``--write-lock`` records what each pinned wheel declares (its ``Requires-Dist`` lines, extras left
out) in ``gpu_wheels.lock.json``, read from the index's metadata by ``pip install --dry-run --report``
without downloading the wheels. kvseg's tests check the list against that lock, not against the
packages that happen to be installed where the tests run.

Bad input ends with one line ``error: ...`` and exit status 2. Needs only pip (and its packaging).
"""

from __future__ import annotations

import argparse
import email.parser
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # a bare download machine: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

PINS = Path(__file__).with_name("gpu_wheels.txt")
LOCK = Path(__file__).with_name("gpu_wheels.lock.json")
# What a machine "with PyTorch" has: torch, the requirements of its wheel, and numpy.
PROVIDED = frozenset({"torch", "numpy", "filelock", "fsspec", "jinja2", "markupsafe", "mpmath", "networkx", "setuptools",
                      "sympy", "typing-extensions", "triton"})
PROVIDED_PREFIXES = ("nvidia-",)  # the CUDA libraries of a torch wheel: nvidia-cudnn-cu12, ...
DEFAULT_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)] + ["manylinux2014_x86_64"]


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""


def read_pins(path: Path = PINS) -> dict[str, str]:
    """``{canonical name: version}`` of a requirements file holding only ``name==version`` lines."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", text)
        if not match:
            raise UserError(f"{path}:{number}: expected name==version, got {text!r}")
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def is_provided(name: str) -> bool:
    name = canonicalize_name(name)
    return name in PROVIDED or name.startswith(PROVIDED_PREFIXES)


def target_environment(python_version: str, platforms: Sequence[str]) -> dict[str, str]:
    """The values of environment markers (PEP 508) on the target machine."""
    matches = [re.fullmatch(r"manylinux(?:1|2010|2014|_\d+_\d+)_(\w+)", tag) for tag in platforms]
    machines = {match.group(1) for match in matches if match}
    if not all(matches) or len(machines) != 1:
        raise UserError(f"--platform: expected manylinux tags of one architecture, got {', '.join(platforms)}")
    return {
        "python_version": python_version, "python_full_version": f"{python_version}.0",
        "implementation_name": "cpython", "implementation_version": f"{python_version}.0",
        "platform_python_implementation": "CPython", "os_name": "posix", "sys_platform": "linux",
        "platform_system": "Linux", "platform_machine": machines.pop(), "platform_release": "", "platform_version": "",
        "extra": "",
    }


def needed(requirements: Iterable[str], environment: Mapping[str, str]) -> list[Requirement]:
    """The requirements that apply on the target (no extras are installed)."""
    parsed = (Requirement(text) for text in requirements)
    return [req for req in parsed if req.marker is None or req.marker.evaluate(dict(environment))]


def uncovered(declared: Mapping[str, Iterable[str]], listed: Iterable[str], environment: Mapping[str, str]) -> list[str]:
    """``"<package> requires <requirement>"`` for each requirement neither listed nor provided."""
    names = {canonicalize_name(name) for name in listed}
    return [
        f"{package} requires {req}"
        for package, requirements in sorted(declared.items())
        for req in needed(requirements, environment)
        if canonicalize_name(req.name) not in names and not is_provided(req.name)
    ]


def provided_floors(declared: Mapping[str, Iterable[str]], listed: Iterable[str], environment: Mapping[str, str]) -> list[str]:
    """The tightest bounds the wheels put on packages the machine must already have.

    E.g. ``numpy>=2.0.0 (ml-dtypes 0.6.0)``: the highest lower bound and the lowest upper bound of
    each, with the package that asks for it; other specifiers (``==``, ``!=``, ``~=``) as they are.
    """
    names = {canonicalize_name(name) for name in listed}
    lowest: dict[str, tuple[Version, str]] = {}
    highest: dict[str, tuple[Version, str]] = {}
    other: list[str] = []
    for package, requirements in sorted(declared.items()):
        for req in needed(requirements, environment):
            name = canonicalize_name(req.name)
            if not is_provided(name) or name in names:
                continue
            for spec in req.specifier:
                text = f"{name}{spec} ({package})"
                if spec.operator in (">=", ">") and (name not in lowest or Version(spec.version) > lowest[name][0]):
                    lowest[name] = (Version(spec.version), text)
                elif spec.operator in ("<", "<=") and (name not in highest or Version(spec.version) < highest[name][0]):
                    highest[name] = (Version(spec.version), text)
                elif spec.operator not in (">=", ">", "<", "<="):
                    other.append(text)
    return sorted([text for _, text in (*lowest.values(), *highest.values())] + other)


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """Name, version and ``Requires-Dist`` lines of a wheel, from its METADATA."""
    try:
        name, version, _, _ = parse_wheel_filename(path.name)
        with zipfile.ZipFile(path) as wheel:
            member = next(m for m in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", m))
            message = email.parser.Parser().parsestr(wheel.read(member).decode("utf-8"))
    except (ValueError, StopIteration, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable wheel ({type(exc).__name__})") from None
    return canonicalize_name(name), str(version), message.get_all("Requires-Dist") or []


def check_folder(folder: Path, pins: Mapping[str, str], environment: Mapping[str, str]) -> list[str]:
    """Problems of a downloaded folder: pinned packages without their wheel, requirements not covered."""
    wheels = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, requires = wheel_metadata(path)
        wheels[name] = (version, requires)
    problems = [f"no wheel of {name}=={version}" for name, version in pins.items()
                if name not in wheels or Version(wheels[name][0]) != Version(version)]
    problems += [f"{name} is not in the list" for name in wheels if name not in pins]
    declared = {f"{name} {version}": requires for name, (version, requires) in wheels.items()}
    return problems + uncovered(declared, pins, environment)


def _platform_flags(platforms: Sequence[str]) -> list[str]:
    return [flag for tag in platforms for flag in ("--platform", tag)]


def declared_requirements(pins_file: Path, python_version: str, platforms: Sequence[str]) -> dict[str, dict]:
    """``{name: {"version", "requires_dist"}}`` of every pinned wheel for the target, from the index's metadata.

    ``pip install --dry-run --report`` resolves the pinned wheels (no dependencies) and reads their
    metadata files (PEP 658) without downloading the wheels. Requirements of extras are left out:
    no extra of these packages is installed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
                   "--only-binary=:all:", "--implementation", "cp", "--python-version", python_version,
                   *_platform_flags(platforms), "--target", str(Path(tmp) / "target"), "--report", str(report),
                   "--requirement", str(pins_file)]
        if subprocess.run(command).returncode != 0:
            raise UserError(f"pip could not resolve {pins_file} for Python {python_version} (see pip's message above)")
        installs = json.loads(report.read_text())["install"]
    lock = {}
    for item in installs:
        meta = item["metadata"]
        requires = [r for r in meta.get("requires_dist") or [] if "extra ==" not in r.replace("'", '"')]
        lock[canonicalize_name(meta["name"])] = {"version": meta["version"], "requires_dist": requires}
    return dict(sorted(lock.items()))


def read_lock(path: Path = LOCK) -> dict[str, dict]:
    """The lock written by ``--write-lock``: ``{name: {"version", "requires_dist"}}``."""
    return json.loads(path.read_text())


def download(folder: Path, pins_file: Path, python_version: str, platforms: Sequence[str]) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
               "--python-version", python_version, "--dest", str(folder), "--requirement", str(pins_file)]
    for tag in platforms:
        command += ["--platform", tag]
    if subprocess.run(command).returncode != 0:
        raise UserError(f"pip download failed for Python {python_version} (see pip's message above)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", help="where the wheels go (created)")
    parser.add_argument("--python-version", default="3.11", help="of the GPU machine, e.g. 3.11 (default)")
    parser.add_argument("--platform", action="append", help="wheel platform tag, repeatable (default: manylinux up to "
                        "glibc 2.28, x86_64)")
    parser.add_argument("--requirements", type=Path, default=PINS, help=f"pinned list (default {PINS.name})")
    parser.add_argument("--check-only", action="store_true", help="check the folder, download nothing")
    parser.add_argument("--write-lock", action="store_true",
                        help=f"write what each pinned wheel declares to {LOCK.name} (no download) and stop")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        raise UserError(f"--python-version: expected 3.N, got {args.python_version!r}")
    platforms = args.platform or DEFAULT_PLATFORMS
    environment = target_environment(args.python_version, platforms)
    if not args.requirements.is_file():
        raise UserError(f"{args.requirements}: requirements file not found")
    pins = read_pins(args.requirements)
    if args.write_lock:
        lock = declared_requirements(args.requirements, args.python_version, platforms)
        LOCK.write_text(json.dumps(lock, indent=1) + "\n")
        print(f"wrote {LOCK}: the declared requirements of {len(lock)} pinned wheels")
        return
    if args.folder is None:
        raise UserError("expected a WHEELS_DIR (or --write-lock)")
    if args.folder.exists() and not args.folder.is_dir():
        raise UserError(f"{args.folder}: exists and is not a folder")
    if args.check_only and not args.folder.is_dir():
        raise UserError(f"{args.folder}: folder not found (nothing to check)")
    if not args.check_only:
        args.folder.mkdir(parents=True, exist_ok=True)
        download(args.folder, args.requirements, args.python_version, platforms)
    problems = check_folder(args.folder, pins, environment)
    if problems:
        raise UserError(f"{args.folder}: {'; '.join(problems)}")
    wheels = sorted(args.folder.glob("*.whl"))
    for path in wheels:
        print(f"{path.stat().st_size / 1e6:9.2f} MB  {path.name}")
    total = sum(path.stat().st_size for path in wheels) / 1e6
    print(f"{len(wheels)} wheels, {total:.1f} MB; every declared requirement is in the folder or provided by PyTorch")
    floors = provided_floors({f"{n} {v}": r for n, v, r in map(wheel_metadata, wheels)}, pins, environment)
    if floors:
        print("The GPU machine must already have: " + "; ".join(floors))
    print(f"Install there (in the repository): pip install --no-index --find-links {args.folder} -e .")


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
