"""The project's own modules import each other without a circle, and each room of pretrain/ keeps its rules.

The graph is built from the source with `ast`, not by importing: every `import` statement counts, at
module level or inside a function (a lazy import is still a dependency, and a circle through one
shows up as a half-initialised module the first time that function runs at an unlucky moment).
`from pkg import name` points at pkg.name when that is a module, else at pkg itself. Imports under
`if TYPE_CHECKING:` are left out: they never run (data/tokenizer_hf.py names its caller's class that way). A package
`__init__.py` that re-exports names lazily through an `_EXPORTS = {name: "module"}` table (data/,
PEP 562) points at each module the table names. Importing pkg.sub is not counted as importing pkg:
Python runs pkg/__init__.py first, but a package that re-exports its submodules (models/, losses/)
would otherwise be a circle with every one of them, which is how packages are meant to work.

Rooms of pretrain/ and what they may import (the docstring of each room's __init__.py says the same):
the graph reads top-down, entry points -> train -> settings -> evaluate / checkpoints -> observe ->
models / losses / data -> runtime.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pretrain", "models", "losses", "data")

# room -> rooms of pretrain/ it must not import (models, losses and data never import pretrain at all)
FORBIDDEN = {
    "pretrain.runtime": ("pretrain.train", "pretrain.settings", "pretrain.evaluate", "pretrain.checkpoints",
                         "pretrain.observe"),
    "pretrain.observe": ("pretrain.train", "pretrain.settings", "pretrain.evaluate", "pretrain.checkpoints"),
    "pretrain.checkpoints": ("pretrain.train", "pretrain.settings", "pretrain.evaluate"),
    "pretrain.evaluate": ("pretrain.train", "pretrain.settings"),
    "pretrain.settings": ("pretrain.train",),
    "models": ("pretrain",), "losses": ("pretrain",), "data": ("pretrain",),
}
ENTRY_POINTS = ("pretrain.main", "pretrain.demo", "pretrain.export", "pretrain.report", "pretrain.fused_adam",
                "pretrain.clip_benchmark_cli",
                "pretrain.evaluate.__main__")


def module_files(root: Path) -> dict[str, Path]:
    """{dotted module name: file} for the project's packages under `root`."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _base(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against `name`)."""
    if not node.level:
        return node.module or ""
    here = name.split(".") if is_package else name.split(".")[:-1]
    here = here[:len(here) - node.level + 1]
    return ".".join(here + ([node.module] if node.module else []))


def _owner(dotted: str, modules) -> str | None:
    """The longest project module that `dotted` (a module or module.attribute) lies in."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _lazy_exports(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            return [v.value for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return []


def _executed(tree: ast.AST):
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:`, which never run."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
        else:
            todo += ast.iter_child_nodes(node)


def build_graph(root: Path = REPO) -> dict[str, set[str]]:
    """{module: the project modules it imports}, from the source under `root`."""
    files = module_files(root)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets = set(_lazy_exports(tree))
        for node in _executed(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _base(name, is_package, node)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in files else base)
        graph[name] = {t for t in (_owner(t, files) for t in targets) if t is not None and t != name}
    return graph


def components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module: each is one tangle of circles."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def connect(v):  # Tarjan; the graph is a few hundred nodes, recursion depth is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(set(scc))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sccs


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> b -> ... -> a) through each tangle."""
    return [_circle(graph, scc) for scc in components(graph)]


def _circle(graph, scc: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(scc)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & scc):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return sorted(scc)


def describe(graph: dict[str, set[str]]) -> str:
    return "\n".join(f"  {len(scc)} modules import each other ({', '.join(sorted(scc))}), e.g. "
                     + " -> ".join(_circle(graph, scc)) for scc in components(graph))


def test_no_import_cycle():
    graph = build_graph()
    assert not find_cycles(graph), "import circles among the project's modules:\n" + describe(graph)


def test_rooms_import_only_downward():
    graph = build_graph()
    wrong = []
    for name, targets in sorted(graph.items()):
        for room, forbidden in FORBIDDEN.items():
            if name == room or name.startswith(room + "."):
                wrong += [f"{name} -> {t}" for t in sorted(targets)
                          if any(t == f or t.startswith(f + ".") for f in forbidden)]
        if name not in ENTRY_POINTS:  # an entry point may call another's code (the demo exports)
            wrong += [f"{name} -> {t} (an entry point)" for t in sorted(targets) if t in ENTRY_POINTS]
    assert not wrong, "imports against the rooms' rules (pretrain/__init__.py):\n  " + "\n  ".join(wrong)


def test_the_graph_sees_lazy_and_submodule_imports(tmp_path):
    """Known answer: a circle closed only by a function-level `from pkg import submodule` is found."""
    pkg = tmp_path / "pretrain"
    (pkg / "room").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "room" / "__init__.py").write_text('"""A room."""\n')
    (pkg / "room" / "a.py").write_text("from pretrain.room.b import thing\n")
    (pkg / "room" / "b.py").write_text("thing = 1\n\ndef late():\n    from pretrain.room import c\n")
    (pkg / "room" / "c.py").write_text("from . import a\n")
    for other in PACKAGES[1:]:
        (tmp_path / other).mkdir()
    graph = build_graph(tmp_path)
    assert graph["pretrain.room.b"] == {"pretrain.room.c"}
    assert find_cycles(graph) == [["pretrain.room.a", "pretrain.room.b", "pretrain.room.c", "pretrain.room.a"]]
    (pkg / "room" / "c.py").write_text("import pretrain.room\n")   # the package, not a: no circle
    assert find_cycles(build_graph(tmp_path)) == []
    (pkg / "room" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    assert find_cycles(build_graph(tmp_path)) == []   # never runs


if __name__ == "__main__":  # python tests/test_import_graph.py [ROOT]: print the circles of another checkout
    graph = build_graph(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO)
    print(describe(graph) or "no import circle")
    sys.exit(1 if find_cycles(graph) else 0)
