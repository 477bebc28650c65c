"""The package's import graph: no cycles (imports inside functions count), and the engine reaches
the stores only through their protocols and their factory."""

from __future__ import annotations

import ast
from pathlib import Path

import sglang_objectcache

ROOT = Path(sglang_objectcache.__file__).parent
PKG = "sglang_objectcache"


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The package modules `path` imports anywhere in its body (not under `if TYPE_CHECKING:`)."""
    pkg = root.name
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b` imports a.b where b is a module, else a
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            targets = []
        for t in targets:
            if t.split(".")[0] == pkg and t != name:
                # importing a.b.c runs a and a.b first
                parts = t.split(".")
                out.update(".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    out.discard(name)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {_module_name(f, root) for f in files}
    return {_module_name(f, root): _imports(f, modules, root) for f in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None (depth-first search with an explicit path)."""
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def dfs(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt, path)):
                return found
        path.pop()
        state[node] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := dfs(n, [])):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and f"{PKG}.engine.cache" in graph[f"{PKG}.sglang.backend"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_a_cycle_hidden_inside_a_function(tmp_path):
    """The detector itself, on a package like the old one: `factory` imports `cache` inside a
    function, `cache` imports `factory` at the top; a TYPE_CHECKING import is no edge."""
    pkg = tmp_path / "pkg"
    (pkg / "stores").mkdir(parents=True)
    (pkg / "engine").mkdir()
    for d in (pkg, pkg / "stores", pkg / "engine"):
        (d / "__init__.py").write_text("")
    (pkg / "engine" / "cache.py").write_text("from ..stores.factory import build\n")
    (pkg / "stores" / "factory.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..engine import cache\n"
        "def build():\n    from ..engine.cache import X\n")
    graph = import_graph(pkg)
    assert graph["pkg.stores.factory"] == {"pkg.engine", "pkg.engine.cache"}
    assert _cycle(graph) == ["pkg.engine.cache", "pkg.stores.factory", "pkg.engine.cache"]
    (pkg / "stores" / "factory.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..engine import cache\n")
    assert _cycle(import_graph(pkg)) is None


def test_the_engine_reaches_stores_only_through_their_protocols_and_factory():
    doors = {f"{PKG}.stores", f"{PKG}.stores.base", f"{PKG}.stores.factory"}
    for mod, deps in import_graph().items():
        if mod.startswith(f"{PKG}.engine"):
            concrete = {d for d in deps if d.startswith(f"{PKG}.stores")} - doors
            assert not concrete, f"{mod} imports {sorted(concrete)}"
