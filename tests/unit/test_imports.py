"""The import rule: every import points down the ranks, nothing imports late, no cycles.

Ranks (docs/design.md): 0 the shared vocabulary (top-level modules, and ``compat``: the one
module per library whose private parts we touch), 1 ``shared``,
2 ``pipeline`` / ``cache`` / ``auth`` (which never import each other), 3 ``edge``,
4 ``ops``, 5 ``cli`` (6 ``__main__``). The sandbox imports nothing of the proxy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "proxy"
PACKAGE_RANKS = {
    "compat": 0,
    "shared": 1,
    "pipeline": 2,
    "cache": 2,
    "auth": 2,
    "edge": 3,
    "ops": 4,
}
MODULE_RANKS = {"cli": 5, "__main__": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The unit a module belongs to: its package under proxy/, or the module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "proxy"


def rank(module: str) -> int:
    unit = part_of(module)
    return PACKAGE_RANKS.get(unit, MODULE_RANKS.get(unit, 0))


def imports(tree: ast.Module) -> list[tuple[str, bool, int]]:
    """(imported proxy module, at module level, line) for every import in ``tree``."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            # "from proxy.edge import fast": the submodule is what is imported
            names += [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "proxy" or name.startswith("proxy."):
                found.append((name, id(node) in top, node.lineno))
    return found


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
GRAPH = {
    name: [(i, top, line) for i, top, line in imports(ast.parse(path.read_text())) if i in MODULES]
    for name, path in MODULES.items()
}


def problems(graph: dict[str, list[tuple[str, bool, int]]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        for target, top, line in targets:
            where = f"{module}:{line} imports {target}"
            sandbox = part_of(module) == "sandbox"
            if not top:
                found.append(f"{where} inside a function (a late import)")
            if sandbox != (part_of(target) == "sandbox"):
                if sandbox or part_of(module) not in ("cli", "__main__"):
                    found.append(f"{where}: the sandbox is self-contained")
                continue
            if rank(target) > rank(module):
                found.append(f"{where}: rank {rank(target)} above {rank(module)}")
            elif rank(target) == rank(module) > 0 and part_of(target) != part_of(module):
                found.append(f"{where}: {part_of(module)} and {part_of(target)} share a rank")
    return found


def cycles(graph: dict[str, list[tuple[str, bool, int]]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target, _, _ in graph.get(node, []):
            if target == node or target in ("proxy",):
                continue
            if state.get(target) == 1:
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
    return found


def test_every_import_points_down_and_none_is_late() -> None:
    assert problems(GRAPH) == []


def test_there_is_no_import_cycle() -> None:
    assert cycles(GRAPH) == []


@pytest.mark.parametrize(
    ("module", "target", "top", "expected"),
    [
        ("proxy.pipeline.budget", "proxy.edge.app", True, "rank 3 above 2"),
        ("proxy.cache.layer", "proxy.auth.layer", True, "share a rank"),
        ("proxy.edge.handlers", "proxy.edge.app", False, "a late import"),
        ("proxy.sandbox.app", "proxy.errors", True, "self-contained"),
        # The CLI may import the sandbox, but at the top like any other import.
        ("proxy.cli", "proxy.sandbox", False, "a late import"),
    ],
)
def test_the_rule_catches_what_it_forbids(
    module: str, target: str, top: bool, expected: str
) -> None:
    [problem] = problems({module: [(target, top, 1)]})
    assert expected in problem


def test_a_cycle_is_found() -> None:
    graph = {"proxy.a": [("proxy.b", True, 1)], "proxy.b": [("proxy.a", True, 1)]}
    assert cycles(graph) == [["proxy.a", "proxy.b", "proxy.a"]]
