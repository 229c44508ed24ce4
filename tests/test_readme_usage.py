"""The README's Usage section: its example runs as written, and its list of public names is complete.

The example is run as a user would run it: the first ```python block under the Usage heading,
saved as a file in an empty directory and run in a fresh interpreter (CPU, the repository on the
path). The list of names must be exactly ``mcr_jax.__all__``: a name added to the package without
a line in the README fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mcr_jax

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHANCE = 0.25  # the example's 4 balanced classes


def _usage_section(readme: Path = README) -> list[str]:
    """The README's lines from the first heading containing "Usage" to the next heading of the same level."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    headings, fenced = {}, False  # line index -> heading level, outside code blocks (a "# comment" is no heading)
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#+ ", line):
            headings[i] = len(line) - len(line.lstrip("#"))
    starts = [i for i in headings if "Usage" in lines[i]]
    assert starts, "README.md has no heading containing 'Usage'"
    start = starts[0]
    end = next((i for i in headings if i > start and headings[i] <= headings[start]), len(lines))
    return lines[start + 1:end]


def _first_python_block(section: list[str]) -> str:
    opening = section.index("```python")
    closing = section.index("```", opening + 1)
    return "\n".join(section[opening + 1:closing]) + "\n"


def _listed_names(section: list[str]) -> list[str]:
    """The backticked name that opens each list item of the section's "public names" subsection."""
    start = next(i for i, line in enumerate(section) if re.match(r"#+ .*public names", line, re.IGNORECASE))
    names = []
    for line in section[start + 1:]:
        if re.match(r"#+ ", line):  # the next subsection (this list holds no code block)
            break
        match = re.match(r"- `([^`]+)`", line)
        if match:
            names.append(match.group(1))
    return names


def test_section_parsing_on_a_small_readme_shape(tmp_path):
    """The helpers read what they claim: the block under Usage (not an earlier one), list items only."""
    text = ("# t\n```python\nearlier()\n```\n## Usage\nprose\n```python\n# a comment\nx = 1\n```\n"
            "### The public names\n- `a` — one\n- `b` — two\nnot `c`\n## Next\n- `d` — other section\n")
    fake = tmp_path / "README.md"
    fake.write_text(text, encoding="utf-8")
    section = _usage_section(fake)
    assert _first_python_block(section) == "# a comment\nx = 1\n"
    assert _listed_names(section) == ["a", "b"]


def test_readme_usage_example_runs_in_an_empty_directory(tmp_path):
    script = tmp_path / "usage.py"
    script.write_text(_first_python_block(_usage_section()), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_NUMPY_RANK_PROMOTION="raise")
    done = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"the README's example failed:\n{done.stdout}\n{done.stderr}"
    found = re.findall(r"test accuracy ([0-9.]+)", done.stdout)
    assert len(found) == 1, f"expected one 'test accuracy <value>' line; got:\n{done.stdout}"
    accuracy = float(found[0])
    assert CHANCE + 0.35 < accuracy <= 1.0, f"accuracy {accuracy} is not clearly above chance ({CHANCE})"


def test_readme_public_names_are_exactly_the_packages():
    names = _listed_names(_usage_section())
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"listed more than once in the README: {duplicates}"
    missing = sorted(set(mcr_jax.__all__) - set(names))
    extra = sorted(set(names) - set(mcr_jax.__all__))
    assert not missing and not extra, (
        f"README's public names differ from mcr_jax.__all__: not listed {missing}; listed but not public {extra}")
