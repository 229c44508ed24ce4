"""Every document the repository cites is one it holds.

Scanned: the tracked (and untracked, not ignored) ``*.py`` and ``*.md`` files. Checked:

- a repository path written out in the text (``docs/…``, ``benchmarks/…``, ``tests/…``, ``mcr_jax/…``,
  ``experiments/…`` ending in ``.md`` or ``.py``, optionally with a ``#anchor`` into a ``.md``) names a
  file that exists, relative to the repository root;
- a relative markdown link ``[text](target)`` in a ``*.md`` file (outside code) points to a file or
  folder that exists, relative to that file; its ``#anchor``, if any, is a heading (GitHub's slug) or
  an explicit ``<a id>``/``<a name>`` of the target ``.md`` file (or of the file itself for ``(#x)``);
- nothing mentions the project's internal specification, which is not shipped: its file name, or
  its section sign.

Pure Python (no JAX): it runs in well under a second.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__", ".ruff_cache", ".pytest_cache"}
# The internal specification's name, built from its letters so that no file (this one included)
# holds the strings forbidden here.
_INTERNAL = "".join(map(chr, (83, 80, 69, 67)))
FORBIDDEN = (_INTERNAL + ".md", _INTERNAL + " §")

PATH_RE = re.compile(
    r"(?<![\w./-])((?:docs|benchmarks|tests|mcr_jax|experiments)/[\w./-]*?[\w-]\.(?:md|py))(#[\w-]+)?(?![\w/])"
)
LINK_RE = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
ANCHOR_TAG_RE = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
FENCE_RE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE_RE = re.compile(r"`[^`\n]*`")
HEADING_RE = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def scanned_files(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """The ``*.py`` and ``*.md`` files git knows or would add (tracked, or untracked and not ignored);
    a walk of the tree, skipping ``.git`` and environments, where git is not available."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.py", "*.md"],
            cwd=root, capture_output=True, text=True, check=True, timeout=30,
        ).stdout
        files = [root / line for line in out.splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in root.rglob("*") if p.suffix in (".py", ".md")
                 and not SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(p for p in files if p.is_file())


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: links reduced to their text, lower case, punctuation other
    than ``-`` and ``_`` dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _markdown_lines(text: str):
    """``(line_number, line)`` outside fenced code blocks, inline code removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE_RE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, INLINE_CODE_RE.sub("", line)


def anchors_of(path: pathlib.Path) -> set[str]:
    """The anchors of a markdown file: its headings' slugs (repeats numbered ``-1``, ``-2`` … as GitHub
    does) and its explicit ``<a id=…>`` / ``<a name=…>`` tags."""
    text = path.read_text(encoding="utf-8")
    found: set[str] = set(ANCHOR_TAG_RE.findall(text))
    counts: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if FENCE_RE.match(line):
            fenced = not fenced
            continue
        if not fenced and (m := HEADING_RE.match(line)):
            slug = github_slug(m.group(1))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def problems_in(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """Every broken citation in one file, as ``"file:line: what"``."""
    rel = path.relative_to(root).as_posix()
    text = path.read_text(encoding="utf-8")
    out: list[str] = []
    cache: dict[pathlib.Path, set[str]] = {}

    def anchor_ok(target: pathlib.Path, anchor: str) -> bool:
        if target.suffix != ".md":
            return True
        if target not in cache:
            cache[target] = anchors_of(target)
        return anchor in cache[target]

    for number, line in enumerate(text.splitlines(), 1):
        for bad in FORBIDDEN:
            if bad in line:
                out.append(f"{rel}:{number}: mentions {bad!r}, a document the repository does not ship")
        for m in PATH_RE.finditer(line):
            cited, anchor = m.group(1), m.group(2)
            target = root / cited
            if not target.is_file():
                out.append(f"{rel}:{number}: cites {cited}, which the repository does not hold")
            elif anchor and not anchor_ok(target, anchor[1:]):
                out.append(f"{rel}:{number}: cites {cited}{anchor}, a heading {cited} does not have")
    if path.suffix == ".md":
        for number, line in _markdown_lines(text):
            for m in LINK_RE.finditer(line):
                link = m.group(1)
                if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", link):  # http:, https:, mailto:, …
                    continue
                file_part, _, anchor = link.partition("#")
                target = (path.parent / file_part).resolve() if file_part else path
                if file_part and not target.exists():
                    out.append(f"{rel}:{number}: links to {link}, which does not exist")
                elif anchor and not anchor_ok(target, anchor):
                    out.append(f"{rel}:{number}: links to {link}, an anchor the target does not have")
    return out


def test_every_cited_document_exists():
    files = scanned_files()
    assert any(p.name == "method.md" for p in files), "docs/method.md is missing from the scan"
    problems = [p for path in files for p in problems_in(path)]
    assert not problems, "\n".join(problems)


def test_the_checker_finds_broken_paths_links_anchors_and_the_spec(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# Title\n\n## The game: two forms\n\n## Repeated\n\n## Repeated\n\n<a id=\"custom\"></a>\n\n"
        "[ok](b.md) [ok](#the-game-two-forms) [ok](#repeated-1) [ok](b.md#b-head) [ok](#custom)\n"
        "[ok](https://example.org/x.md) `[code](missing.md)`\n"
        "```\n[in a fence](missing.md)\n```\n"
        "[bad](missing.md) [bad](b.md#nowhere) [bad](#repeated-2)\n"
    )
    (tmp_path / "docs" / "b.md").write_text("## B head\n")
    # upper-case stand-ins, so that this file does not cite the fake paths itself
    source = ('"""See DOCS/a.md and DOCS/a.md#the-game-two-forms and MCR_JAX/x.py, see DOCS/b.md#gone, '
              "https://host/DOCS/far.md, workdir/DOCS/far.md, DOCS/{name}.md.\n" + FORBIDDEN[0] + ' is internal."""\n')
    (tmp_path / "m.py").write_text(source.replace("DOCS/", "docs/").replace("MCR_JAX/", "mcr_jax/"))
    md = problems_in(tmp_path / "docs" / "a.md", tmp_path)
    assert len(md) == 3, md
    assert all(":16:" in p for p in md) and "missing.md" in md[0] and "#nowhere" in md[1] and "#repeated-2" in md[2]
    py = problems_in(tmp_path / "m.py", tmp_path)
    assert len(py) == 3, py
    assert "x.py, which" in py[0] and "b.md#gone" in py[1] and "does not ship" in py[2]


def test_github_slug():
    assert github_slug("The game: two forms") == "the-game-two-forms"
    assert github_slug("Batching: `mcr_jax.data.pipeline` and more") == "batching-mcr_jaxdatapipeline-and-more"
    assert github_slug("See [the docs](x.md) now") == "see-the-docs-now"
    assert github_slug("Greedy, independent & collaborative") == "greedy-independent--collaborative"
