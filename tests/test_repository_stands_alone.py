"""The repository must be readable on its own: no file may send the reader to notes kept outside
it (the early design and reference notes, a sibling `../shared` folder), and every `docs/` page
(and numbered section) that a file cites must exist in this checkout."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
THIS = os.path.relpath(os.path.abspath(__file__), ROOT)

# Text a reader follows; large JSON (workflows, key lists) holds no prose citations.
SUFFIXES = (".py", ".md", ".sh", ".txt", ".toml", ".mjs", ".cfg", ".ini")
NAMES = ("Makefile",)
SKIP_DIRS = {".git", ".venv", ".cache", "node_modules", "__pycache__"}

# Notes that once lived outside the repository, cited by their bare name or name and section
# sign, never as a docs/ path. A docs/ page of the same name would carry its folder and is allowed.
OUTSIDE = [
    re.compile(r"(?<![\w/])(?:DESIGN|REFERENCE|COMFYUI)\.md"),
    re.compile(r"(?<![\w/])(?:DESIGN|REFERENCE)\s*§"),
    re.compile(r"(?:\.\./)+shared\b"),
    re.compile(r"/work/shared\b"),
]
DOC_CITATION = re.compile(r"(?<![\w./-])docs/([\w.-]+\.md)(?:\s*§\s*(\d+))?")


def _tracked_files() -> list[str]:
    """Files git tracks (relative paths); a plain walk when this is not a git checkout (a pack
    installed from an archive still has to stand alone)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             timeout=30, check=True).stdout
        files = [p for p in out.decode("utf-8", "replace").split("\0") if p]
        if files:
            return files
    except (OSError, subprocess.SubprocessError):
        pass
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        found += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames]
    return found


def _text_files() -> dict[str, str]:
    texts = {}
    for rel in _tracked_files():
        if rel == THIS or not (rel.endswith(SUFFIXES) or os.path.basename(rel) in NAMES):
            continue
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path):  # deleted in the work tree, not yet committed
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            texts[rel] = f.read()
    return texts


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    found = _text_files()
    assert any(rel.endswith(".py") for rel in found), "no source files found; wrong root?"
    return found


def _where(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def test_no_file_cites_notes_outside_the_repository(texts):
    hits = [f"{rel}:{_where(text, m.start())}: {m.group(0)!r}"
            for rel, text in sorted(texts.items()) for pattern in OUTSIDE
            for m in pattern.finditer(text)]
    assert not hits, ("these lines point outside the repository; cite the docs/ page that holds "
                      "the fact instead (docs/ARCHITECTURE.md, docs/REFERENCE_NOTES.md):\n"
                      + "\n".join(hits))


def _numbered_sections(name: str) -> set[str]:
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return set(re.findall(r"^#+\s+(\d+)\.", f.read(), flags=re.M))


def test_every_cited_docs_page_and_section_exists(texts):
    missing, cited = [], set()
    for rel, text in sorted(texts.items()):
        for m in DOC_CITATION.finditer(text):
            name, section = m.group(1), m.group(2)
            cited.add(name)
            where = f"{rel}:{_where(text, m.start())}: {m.group(0)!r}"
            if not os.path.isfile(os.path.join(DOCS, name)):
                missing.append(f"{where} (no such page)")
            elif section is not None and section not in _numbered_sections(name):
                missing.append(f"{where} (the page has no section '{section}.')")
    assert not missing, "citations of docs/ that lead nowhere:\n" + "\n".join(missing)
    # The pages that replaced the outside notes are cited from the code they explain.
    assert {"ARCHITECTURE.md", "REFERENCE_NOTES.md"} <= cited
