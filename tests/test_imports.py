"""pizoo's modules import each other without cycles (module-level and function-level imports alike)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pizoo"


# Known cycles, by edge, with why each is left (none now: the RoPE math reads pizoo.rope_config, not
# pizoo.config, so a family hook may use it); any cycle fails the test.
KNOWN_EDGES: set[tuple[str, str]] = set()


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (never run, so no cycle at run time)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Edges between pizoo's modules. Left out: imports under TYPE_CHECKING, a submodule's import of a
    package above it (Python runs a package's __init__ before any of its submodules, so a registry
    package that imports its modules last, like pizoo.families, adds no ordering), KNOWN_EDGES."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("pizoo", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(parts + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            graph[name].update(c for c in candidates if c in modules and c != name and c != "pizoo"
                               and not name.startswith(c + ".") and (name, c) not in KNOWN_EDGES)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert graph["pizoo.hub"] >= {"pizoo.card", "pizoo.zoo"}  # the graph sees real imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_checker_sees_function_level_imports_and_skips_type_checking_ones():
    graph = import_graph()
    assert "pizoo.hub" in graph["pizoo.resolve"]  # `from .hub import pull` inside resolve_model
    assert "pizoo.config" not in graph["pizoo.families"]  # only under TYPE_CHECKING


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
