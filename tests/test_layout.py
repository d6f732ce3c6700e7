"""The package's layout holds: imports follow the data flow, no import circles, small modules, a working public API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ablation_core"

# Lower layers never import higher ones: models -> methods -> patches is the data flow; imports point down.
LAYERS = ["errors", "files", "models", "toy", "patches", "methods", "evaluation", "backends", "cli"]
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(["ablation_core", *parts])] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every ablation_core module ``name`` imports, at the top or inside functions (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    type_checking = [node for node in ast.walk(tree)
                     if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    skipped = {id(n) for node in type_checking for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t.startswith("ablation_core")}
    return found


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return target or None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        imported = {_resolve(t, modules) for t in _imports(name, path)}
        # a module's own packages are imported before it anyway; "from . import x" names them without a circle
        graph[name] = {m for m in imported if m and not (name + ".").startswith(m + ".")}
    return graph


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_imports_point_down_the_data_flow():
    wrong = []
    for module, imported in _graph().items():
        own = _layer(module)
        if own not in LAYERS:
            continue
        for other in imported:
            theirs = _layer(other)
            if theirs in LAYERS and LAYERS.index(theirs) > LAYERS.index(own):
                wrong.append(f"{module} imports {other}")
    assert not wrong, "\n".join(wrong)


def test_there_are_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if state.get(start) is None and visit(start, []):
            break
    assert not cycle, " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_public_api_names_resolve_and_stay_light():
    code = ("import sys, ablation_core as a; assert all(getattr(a, n) is not None for n in a.__all__ "
            "if n != 'load_model'); import nodes; "
            "assert 'diffusers' not in sys.modules, 'the nodes must not need diffusers'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
