"""The commands in README.md and docs/ use only flags and config keys that exist.

Every fenced code block is read; each kvseg command line in it (``train_ddp.py``, ``export.py``,
``benchmark.py``, ``python -m kvseg.X``, ``kvseg X``; behind ``accelerate launch`` or ``torchrun``
too) has its ``--flags`` checked against the command's own parser, and every ``--set key=value``
against the config's fields. Links to files inside the repository must point at files that exist.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO
from kvseg.commands import benchmark, check, export, predict, preprocess, report, train
from kvseg.config import Config

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PARSERS = {"train": train, "export": export, "benchmark": benchmark, "predict": predict, "check": check, "report": report,
           "preprocess": preprocess}
SCRIPTS = {"train_ddp.py": "train", "export.py": "export", "benchmark.py": "benchmark"}


def fenced_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every line inside a fenced block; continuation lines (``\\``) joined."""
    out, inside, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        text = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        if not pending:
            start = number
        pending += text.rstrip("\\").strip() + " "
        if not text.rstrip().endswith("\\"):
            out.append((start, pending.strip()))
            pending = ""
    return out


def kvseg_commands(command: str) -> list[tuple[str, list[str]]]:
    """(command name, its arguments) for each kvseg command in one shell line (``&&`` and ``|`` split it)."""
    found = []
    for part in re.split(r"&&|\|\||;|\|(?!\w)", command):
        try:
            words = shlex.split(part.replace("[", " ").replace("]", " ").replace("'", "").replace("`", " "))
        except ValueError:
            continue
        for i, word in enumerate(words):
            name = SCRIPTS.get(Path(word).name)
            if name:
                found.append((name, words[i + 1:]))
                break
            if word == "-m" and i + 1 < len(words) and words[i + 1].removeprefix("kvseg.") in PARSERS:
                found.append((words[i + 1].split(".", 1)[1], words[i + 2:]))
                break
            if word in ("kvseg", "-m kvseg") and i + 1 < len(words) and words[i + 1] in PARSERS:
                found.append((words[i + 1], words[i + 2:]))
                break
    return found


def config_key_exists(key: str) -> bool:
    node: object = Config
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return False
        default = fields[part].default_factory() if fields[part].default_factory is not dataclasses.MISSING else None
        node = default if dataclasses.is_dataclass(default) else None
    return True


def problems_in(path: Path) -> list[str]:
    problems = []
    for number, line in fenced_lines(path):
        for name, args in kvseg_commands(line):
            flags = {flag for action in PARSERS[name].build_parser()._actions for flag in action.option_strings}
            for i, arg in enumerate(args):
                flag = arg.split("=", 1)[0]
                if flag.startswith("--") and flag not in flags:
                    problems.append(f"{path.name}:{number}: {name} has no flag {flag}")
                if flag == "--set" and i + 1 < len(args):
                    key = args[i + 1].split("=", 1)[0]
                    if not config_key_exists(key):
                        problems.append(f"{path.name}:{number}: --set {key}: no such config key")
    return problems


def test_the_docs_are_read() -> None:
    lines = [line for path in DOCS for _, line in fenced_lines(path)]
    commands = [name for line in lines for name, _ in kvseg_commands(line)]
    assert {"train", "export", "benchmark", "predict", "check", "preprocess", "report"} <= set(commands)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_flag_and_config_key_in_the_docs_exists(path: Path) -> None:
    assert problems_in(path) == []


def test_a_flag_that_does_not_exist_is_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```bash\naccelerate launch --num_processes 2 train_ddp.py --epochs 2 --warp 9 --set train.nope=1\n"
                    "python -m kvseg.predict --onnx m.onnx x.png --out o/ \\\n    --smooth 0.5 --blur 3\n```\n")
    assert problems_in(page) == ["page.md:2: train has no flag --warp", "page.md:2: --set train.nope: no such config key",
                                 "page.md:3: predict has no flag --blur"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_links_to_repository_files_exist(path: Path) -> None:
    missing = []
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
        if not (path.parent / target).exists():
            missing.append(target)
    assert missing == []
