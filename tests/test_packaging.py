"""pyproject.toml declares exactly the third-party distributions that mcr_jax/ imports.

Every import in every module of the package counts, module-level and lazy (inside functions) alike;
a module is third-party when it is neither stdlib nor mcr_jax, and it is mapped to its distribution
with ``importlib.metadata.packages_distributions()``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mcr_jax"


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


def declared_dependencies(pyproject: pathlib.Path) -> set[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {_normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", d.strip()).group(0)) for d in deps}


def compare(declared: set[str], imported: set[str]) -> list[str]:
    problems = []
    if missing := sorted(imported - declared):
        problems.append(f"imported by mcr_jax but not in [project].dependencies: {missing}")
    if extra := sorted(declared - imported):
        problems.append(f"in [project].dependencies but not imported by mcr_jax: {extra}")
    return problems


def test_dependencies_match_imports():
    declared = declared_dependencies(ROOT / "pyproject.toml")
    modules = imported_top_level_modules(PACKAGE)
    imported, unmapped = third_party_distributions(
        modules, importlib.metadata.packages_distributions(), frozenset(declared)
    )
    assert not unmapped, f"imported but not installed (no distribution found): {unmapped}"
    assert not compare(declared, imported), "\n".join(compare(declared, imported))


def test_compare_flags_missing_and_extra():
    assert compare({"jax", "numpy"}, {"jax", "numpy"}) == []
    missing = compare({"jax"}, {"jax", "numpy"})
    assert len(missing) == 1 and "numpy" in missing[0] and "not in" in missing[0]
    extra = compare({"jax", "chex"}, {"jax"})
    assert len(extra) == 1 and "chex" in extra[0] and "not imported" in extra[0]


def test_lazy_imports_are_seen(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import os\nfrom . import x\n\ndef f():\n    import sklearn.svm\n    from PIL import Image\n"
    )
    modules = imported_top_level_modules(pkg)
    dists, unmapped = third_party_distributions(modules, {"sklearn": ["scikit-learn"], "PIL": ["Pillow"]})
    assert dists == {"scikit-learn", "pillow"} and unmapped == []
