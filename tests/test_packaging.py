"""pyproject.toml declares exactly the third-party distributions that mcr_jax/ imports, in two layers.

- The core ``[project].dependencies``: exactly what the core modules (``mcr_jax``, ``mcr_jax.losses``,
  ``mcr_jax.game``, ``mcr_jax.players``, ``mcr_jax.models``) and every mcr_jax module they import,
  transitively, import: what a user composing the losses and the game into their own loop installs.
- The core plus the ``train`` extra: exactly what all of mcr_jax/ imports.

Every import counts, module-level and lazy (inside functions) alike, except those under
``if TYPE_CHECKING:`` (never run); a module is third-party when it is neither stdlib nor mcr_jax, and it
is mapped to its distribution with ``importlib.metadata.packages_distributions()``. Importing
``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too, so the closure holds the parent packages.
The experiment entry points are not part of the installed package (``experiments*`` is excluded).
"""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mcr_jax"
#: the modules a JAX user composes into their own training loop; `pip install .` must make them importable
CORE = ("mcr_jax", "mcr_jax.losses", "mcr_jax.game", "mcr_jax.players", "mcr_jax.models")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_top_level_modules(package_dir: pathlib.Path) -> dict[str, set[str]]:
    """Top-level module name -> files importing it, over every import statement (any depth)."""
    found: dict[str, set[str]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(package_dir.parent)))
    return found


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _run_imports(tree: ast.AST):
    """Every import statement of ``tree`` at any depth, except inside ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if _is_type_checking(node):
            children = [c for c in children if c not in node.body]
        stack.extend(children)


def package_modules(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_table(package_dir: pathlib.Path) -> dict[str, tuple[set[str], set[str]]]:
    """Module -> (the package's modules it imports, the top-level names of the other modules it imports).

    ``from P import n`` names the module ``P.n`` when it exists, else ``P``; relative imports are resolved;
    importing a module also imports its parent packages."""
    modules = package_modules(package_dir)
    top = package_dir.name
    table: dict[str, tuple[set[str], set[str]]] = {}
    for module, path in modules.items():
        inside: set[str] = set()
        outside: set[str] = set()
        for node in _run_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target.split(".")[0] != top:
                    outside.add(target.split(".")[0])
                    continue
                while target not in modules:
                    target = target.rpartition(".")[0]
                parts = target.split(".")
                inside |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        table[module] = (inside - {module}, outside)
    return table


def import_closure(table, roots) -> set[str]:
    """The package's modules that importing ``roots`` can run (themselves, their parents, and every module
    they import, transitively, at module level or inside functions)."""
    seen: set[str] = set()
    stack = [r for root in roots for r in (".".join(root.split(".")[:i]) for i in range(1, root.count(".") + 2))]
    while stack:
        module = stack.pop()
        if module not in seen:
            seen.add(module)
            stack.extend(table[module][0])
    return seen


def third_party_distributions(modules, distributions_of, declared=frozenset()) -> tuple[set[str], list[str]]:
    """Distribution names (normalised) of the non-stdlib, non-mcr_jax modules; and the modules that
    map to no installed distribution. Where a module is shipped by several distributions, the declared
    ones are taken if any."""
    dists: set[str] = set()
    unmapped: list[str] = []
    for module in sorted(modules):
        if module in sys.stdlib_module_names or module == "mcr_jax":
            continue
        candidates = {_normalise(d) for d in distributions_of.get(module, ())}
        if not candidates:
            unmapped.append(module)
            continue
        dists |= (candidates & declared) or candidates
    return dists, unmapped


def _names(requirements) -> set[str]:
    return {_normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", d.strip()).group(0)) for d in requirements}


def declared_dependencies(pyproject: pathlib.Path, extra: str | None = None) -> set[str]:
    """The core dependencies (``extra=None``) or one optional extra's, names normalised."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return _names(project["dependencies"] if extra is None else project["optional-dependencies"][extra])


def compare(declared: set[str], imported: set[str], where: str = "[project].dependencies",
            what: str = "mcr_jax") -> list[str]:
    problems = []
    if missing := sorted(imported - declared):
        problems.append(f"imported by {what} but not in {where}: {missing}")
    if extra := sorted(declared - imported):
        problems.append(f"in {where} but not imported by {what}: {extra}")
    return problems


def _imported_distributions(modules: set[str], declared: set[str]) -> set[str]:
    imported, unmapped = third_party_distributions(
        modules, importlib.metadata.packages_distributions(), frozenset(declared))
    assert not unmapped, f"imported but not installed (no distribution found): {unmapped}"
    return imported


def test_core_dependencies_match_the_core_imports():
    core = declared_dependencies(ROOT / "pyproject.toml")
    table = import_table(PACKAGE)
    closure = import_closure(table, CORE)
    assert "mcr_jax.losses.mipd" in closure and "mcr_jax.models.fusion" in closure
    modules = set().union(*(table[m][1] for m in closure))
    imported = _imported_distributions(modules, core)
    problems = compare(core, imported, what=f"the core's {len(closure)} modules ({', '.join(CORE)} and what they "
                                            "import)")
    assert not problems, "\n".join(problems) + f"\ncore modules: {sorted(closure)}"


def test_core_and_train_dependencies_match_all_imports():
    core = declared_dependencies(ROOT / "pyproject.toml")
    train = declared_dependencies(ROOT / "pyproject.toml", "train")
    assert not core & train, f"listed both as core and in the train extra: {sorted(core & train)}"
    imported = _imported_distributions(set(imported_top_level_modules(PACKAGE)), core | train)
    problems = compare(core | train, imported, where="[project].dependencies + the train extra")
    assert not problems, "\n".join(problems)


def test_the_wheel_holds_the_library_only():
    """The package list setuptools builds from pyproject's find settings: mcr_jax and its subpackages,
    no top-level `experiments` (or benchmarks/tests) package."""
    setuptools = __import__("setuptools")
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(str(ROOT), include=find.get("include", ["*"]), exclude=find.get("exclude", ()))
    assert "mcr_jax" in packages and "mcr_jax.losses" in packages and "mcr_jax.methods" in packages
    assert all(p == "mcr_jax" or p.startswith("mcr_jax.") for p in packages), packages
    on_disk = {".".join(p.relative_to(ROOT).parts[:-1]) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= set(packages), sorted(on_disk - set(packages))


def _requirement_closure(dists: set[str]) -> set[str]:
    """The installed distributions that ``dists`` require, transitively (markers with extras skipped)."""
    seen: set[str] = set()
    stack = list(dists)
    while stack:
        dist = stack.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        stack.extend(_names(r for r in requires if "extra ==" not in r.replace('"', "").replace("'", "")))
    return seen


def test_the_core_imports_without_the_train_extra(tmp_path):
    """Importing the core, from a folder outside the repository, with every module of the train extra that
    the core's own dependencies do not bring made unimportable."""
    core = declared_dependencies(ROOT / "pyproject.toml")
    train = declared_dependencies(ROOT / "pyproject.toml", "train")
    brought = _requirement_closure(core)
    blocked = sorted(
        module for module, dists in importlib.metadata.packages_distributions().items()
        if {_normalise(d) for d in dists} & (train - brought) and not {_normalise(d) for d in dists} & brought
        and module.isidentifier())
    assert "ml_collections" in blocked and "tensorflow_datasets" in blocked, blocked
    code = (f"import sys\nfor m in {blocked!r}:\n    sys.modules[m] = None\n"
            f"import {', '.join(CORE)}\n"
            "import mcr_jax.models.build\n"
            "assert mcr_jax.__file__.startswith(sys.argv[1]), mcr_jax.__file__\n"
            "print('ok', len(mcr_jax.__all__))\n")
    out = subprocess.run([sys.executable, "-c", code, str(PACKAGE)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-3000:]


def test_compare_flags_missing_and_extra():
    assert compare({"jax", "numpy"}, {"jax", "numpy"}) == []
    missing = compare({"jax"}, {"jax", "numpy"})
    assert len(missing) == 1 and "numpy" in missing[0] and "not in" in missing[0]
    extra = compare({"jax", "chex"}, {"jax"})
    assert len(extra) == 1 and "chex" in extra[0] and "not imported" in extra[0]


def test_the_closure_follows_lazy_imports_and_parents_but_not_type_checking(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")
    (pkg / "a.py").write_text("import numpy\ndef f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nimport optax\n"
                                      "if TYPE_CHECKING:\n    from pkg import c\n    import absl\n"
                                      "else:\n    import jax\n")
    (pkg / "c.py").write_text("import ml_collections\n")
    (pkg / "d.py").write_text("from . import c\n")
    table = import_table(pkg)
    assert table["pkg.sub.b"] == (set(), {"typing", "optax", "jax"})
    assert table["pkg.d"][0] == {"pkg", "pkg.c"}
    assert import_closure(table, ["pkg.a"]) == {"pkg", "pkg.a", "pkg.sub", "pkg.sub.b"}
    assert import_closure(table, ["pkg.d"]) == {"pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.d", "pkg.c"}


def test_lazy_imports_are_seen(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import os\nfrom . import x\n\ndef f():\n    import sklearn.svm\n    from PIL import Image\n"
    )
    modules = imported_top_level_modules(pkg)
    dists, unmapped = third_party_distributions(modules, {"sklearn": ["scikit-learn"], "PIL": ["Pillow"]})
    assert dists == {"scikit-learn", "pillow"} and unmapped == []
