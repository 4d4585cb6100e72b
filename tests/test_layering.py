"""Imports point one way: down the layers a step of RL flows through (task -> rollout ->
reward/advantage -> loss -> train -> jobs/cli), never up, and no file imports itself back.

Every import counts, function-local ones included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "thinkling"

# Bottom to top. A unit is a module or a subpackage directly under thinkling/.
# A unit may import units of lower layers, and itself; never a unit of its own layer or above.
LAYERS = [
    ["errors", "progress"],
    ["files"],
    ["config"],
    ["runs"],
    ["tasks"],
    ["models"],
    ["rollout"],
    ["rewards", "algorithms"],
    ["eval"],
    ["data"],
    ["train"],
    ["lab"],
    ["jobs"],
    ["pipeline", "demo"],
    ["cli"],
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _file_of(module: str) -> Path | None:
    base = PACKAGE.parent.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """The thinkling modules `path` imports (`from pkg import sub` counts as importing `pkg.sub`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("thinkling")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("thinkling"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if _file_of(sub) is not None else node.module)
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "thinkling"


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    return {_module_name(f): {m for m in _imports(f) if _file_of(m) is not None} for f in files}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _graph()} - {"thinkling"}
    assert units <= set(LAYER), f"add these to LAYERS: {sorted(units - set(LAYER))}"


def test_imports_point_down():
    upward = []
    for module, targets in _graph().items():
        src = _unit(module)
        for target in targets:
            dst = _unit(target)
            if src == "thinkling" or dst == src:
                continue
            if LAYER[dst] >= LAYER[src]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
