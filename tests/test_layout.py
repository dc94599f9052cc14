"""The house keeps its plan: arrows between stages go one way, no import circle, no module past ~300 lines.

Read from the source (``ast``), every import counted, those inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "kvseg"
# Lower number: lower layer. A module may import its own stage and any stage of a lower layer;
# stages of one layer (data and models; training and deploy) do not import each other.
LAYERS = {
    "base": 0,  # kvseg/errors.py, config.py, files.py, cli.py, runtime.py, allocator.py
    "data": 1, "models": 1,
    "runs": 2,
    "evaluation": 3,
    "training": 4, "deploy": 4,
    "video": 5, "planning": 5,
    "bench": 6,
    "commands": 7,
    "entry": 8,  # kvseg/__main__.py and the python -m kvseg.check / predict / preprocess / report modules
}
ENTRY_MODULES = {"__main__", "check", "predict", "preprocess", "report", "plan"}
MAX_LINES = 300


def stage_of(module: str) -> str:
    """``kvseg.data.folder`` -> ``data``; a module directly in kvseg/ is ``base`` or ``entry``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # kvseg/__init__.py
    if len(parts) == 2:
        return "entry" if parts[1] in ENTRY_MODULES else "base"
    return parts[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The kvseg modules ``path`` imports (``from kvseg.x import y`` counts kvseg.x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvseg"):
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("kvseg")]
        found.update(name for name in names if name in MODULES)
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def test_arrows_between_stages_go_one_way() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        stage = stage_of(module)
        for target in targets:
            other = stage_of(target)
            if other != stage and LAYERS[other] >= LAYERS[stage]:
                wrong.append(f"{module} ({stage}) imports {target} ({other})")
    assert wrong == []


def test_no_module_imports_itself_back() -> None:
    """No circle in the module graph (depth-first search for a back edge)."""
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]) if target in path else target)
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_every_stage_says_what_it_owns_and_may_import() -> None:
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, init


def test_no_module_is_longer_than_the_limit() -> None:
    assert {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES} == {}


def test_the_layers_cover_every_stage() -> None:
    assert {stage_of(name) for name in MODULES} <= set(LAYERS)
