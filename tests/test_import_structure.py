"""The import structure of the code base: no circles, nothing in the library importing the experiments
or the benchmarks, and a bounded number of floors.

The graph is read from the source with ``ast``. For circles every ``import`` statement counts, at module
level or inside a function (a lazy import is an arrow too); the floors are counted on the house of the
module-level imports (what importing a module runs), and printed for the whole graph too.
``from P import n`` is an arrow to the module ``P.n`` when
``P/n.py`` exists (a submodule), else to ``P``; relative imports are resolved. Arrows to modules
outside the three trees (the standard library, third-party packages) are ignored.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TREES = ("mcr_jax", "experiments", "benchmarks")
#: the most floors the library's house of module-level imports may have (each floor imports only floors
#: below it); it had 11 before the run engine's restructuring.
MAX_FLOORS = 10


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(module: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _statements(tree: ast.Module, lazy: bool):
    if lazy:
        yield from ast.walk(tree)
        return
    for node in tree.body:  # module level, including imports under a module-level if / try
        yield from ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else (node,)


def import_graph(lazy: bool = True) -> dict[str, set[str]]:
    """``{module: {module it imports}}`` over the three trees (``lazy``: imports inside functions too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in _statements(ast.parse(path.read_text(), str(path)), lazy):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a module outside the trees
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` (its modules in import order, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor (1: imports nothing of the trees; else one above the highest it imports);
    ``graph`` must have no circle."""
    out: dict[str, int] = {}

    def floor(node: str) -> int:
        if node not in out:
            out[node] = 1 + max((floor(n) for n in graph[node]), default=0)
        return out[node]

    for node in graph:
        floor(node)
    return out


def _library(graph):
    inside = {m for m in graph if m.split(".")[0] == "mcr_jax"}
    return {m: graph[m] & inside for m in inside}


def test_the_reader_sees_arrows_and_circles():
    graph = import_graph()
    assert "mcr_jax.engine" in graph["mcr_jax.train"]  # a module-level import
    assert "mcr_jax.data.tfds_source" in graph["mcr_jax.data.dataset"]  # a lazy one, inside a function
    assert "mcr_jax.data.tfds_source" not in import_graph(lazy=False)["mcr_jax.data.dataset"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert floors({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == {"a": 3, "b": 2, "c": 1}


def test_no_circles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_arrows_point_from_experiments_to_the_library_only():
    graph = import_graph()
    wrong = sorted((m, t) for m, ts in graph.items() for t in ts
                   if (m.startswith("mcr_jax") and not t.startswith("mcr_jax"))
                   or (m.startswith("experiments") and t.startswith("benchmarks")))
    assert not wrong, f"imports against the layering (library < experiments < benchmarks): {wrong}"


def test_the_library_has_few_floors():
    levels = floors(_library(import_graph(lazy=False)))
    top = max(levels.values())
    print(f"mcr_jax: {len(levels)} modules on {top} floors (module-level imports), "
          f"{max(floors(_library(import_graph())).values())} counting the imports inside functions")
    assert top <= MAX_FLOORS, sorted((v, k) for k, v in levels.items())[-5:]
