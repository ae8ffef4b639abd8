"""The docs stand alone and agree with the code.

* no file of the repository points at documents outside it (a design document, a folder next to the checkout);
* every repository path quoted in ``docs/architecture.md`` and ``docs/extending.md`` exists (paths of files that an
  example there creates are written unquoted);
* the layer table of ``docs/architecture.md`` is the ``LAYERS`` table that ``tests/test_layers.py`` enforces;
* every pointer to a section of docs/architecture.md or docs/contracts.md, written like
  ``(docs/contracts.md, "RSNA layout")``, names a heading of that file (the heading may go on after the name).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/architecture.md", "docs/extending.md")
#: Inline code that starts like this is a repository path.
PATH_PREFIXES = ("rsna19/", "configs/", "tests/", "docs/", "benchmarks/")
#: Written in pieces so that this file does not contain what it looks for.
FORBIDDEN = ("design".upper() + " §", "/".join(["..", "shared"]))
SKIP_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "demo_out"}


def _repo_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), else every file outside the skipped folders."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        files = [ROOT / p for p in out.decode("utf-8").split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            files += [Path(dirpath) / f for f in filenames]
    return [f for f in files if f.is_file() and ".venv" not in f.relative_to(ROOT).parts]


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    keep, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            keep.append(line)
    return "\n".join(keep)


def _section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def _headings(path: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]


def test_no_file_points_outside_the_repository():
    files = _repo_files()
    assert len(files) > 50, "the file listing looks wrong"
    hits = []
    for f in files:
        data = f.read_bytes()
        for word in FORBIDDEN:
            if word.encode() in data:
                line = data[: data.index(word.encode())].count(b"\n") + 1
                hits.append(f"{f.relative_to(ROOT)}:{line}: {word!r}")
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)


@pytest.mark.parametrize("doc", DOCS)
def test_quoted_repository_paths_exist(doc):
    spans = re.findall(r"`([^`\n]+)`", _prose((ROOT / doc).read_text(encoding="utf-8")))
    paths = sorted({s for s in spans if s.startswith(PATH_PREFIXES) and " " not in s})
    assert len(paths) >= 10, f"{doc}: only {len(paths)} quoted paths found; is the parsing right?"
    missing = []
    for p in paths:
        pattern = re.sub(r"<[^>]*>", "*", p)  # rsna19/commands/<name>.py: some file of that form
        found = any(ROOT.glob(pattern)) if "*" in pattern else (ROOT / pattern).exists()
        if not found:
            missing.append(p)
    assert not missing, f"{doc} quotes paths that do not exist: {missing}"


def test_layer_table_is_the_enforced_one():
    spec = importlib.util.spec_from_file_location("_rsna19_test_layers", ROOT / "tests" / "test_layers.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = _section((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"), "Layers")
    documented: dict[str, int] = {}
    for m in re.finditer(r"^  (\w+)(?:/|\.py)\s+\((\d+)\)", table, flags=re.M):  # "  core/   (0)  ..."
        name = "rsna19" if m.group(1) == "__init__" else f"rsna19.{m.group(1)}"
        assert name not in documented, f"{name} is drawn twice in the layer tree"
        documented[name] = int(m.group(2))
    assert documented == module.LAYERS


def test_section_pointers_name_existing_headings():
    headings = {doc: _headings(ROOT / "docs" / doc) for doc in ("architecture.md", "contracts.md")}
    pointer = re.compile(r'docs/(architecture\.md|contracts\.md), \\?"([^"\\]+)\\?"')
    bad, n = [], 0
    for f in _repo_files():
        if f.suffix not in (".py", ".md", ".yaml", ".ipynb", ".txt"):
            continue
        for doc, name in pointer.findall(f.read_text(encoding="utf-8", errors="replace")):
            n += 1
            if not any(h == name or h.startswith(name + " ") for h in headings[doc]):
                bad.append(f"{f.relative_to(ROOT)}: docs/{doc}, {name!r}")
    assert n > 0
    assert not bad, "pointers to sections that do not exist:\n" + "\n".join(bad)
