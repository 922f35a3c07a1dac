"""Every reference to a markdown document in the code, the templates and the docs points at a file of this
repository, so the project's docs stand alone.

A reference is a token that looks like a path ending in ``.md`` (URLs aside). It must resolve to an existing
file, tried relative to the repository root, to docs/ and to the folder of the file that names it; a token
written as a pattern (``*-cpu-decode.md``, ``<date>-<name>.md``) is not a reference. A reference followed by
"section N" (or "sections 3 and 4", "sections 1-3") must name sections that the document numbers as
``## N.`` headings; one followed by a quoted name (``docs/api.md, "Recurrent state and decoding"``) must name
one of its headings. Nothing may point outside the repository at the briefs the project was built from.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (folder, glob) pairs scanned, relative to the repository root
SCANNED = (("attngen", "**/*.py"), ("attngen", "**/*.j2"), ("docs", "*.md"), (".", "README.md"),
           ("benchmarks", "**/*.py"), ("tests", "*.py"), ("scripts", "*"), ("bench", "**/*.py"),
           ("bench", "**/*.md"))
# written in two pieces so that this file does not contain what it looks for
FORBIDDEN = ("shared" + "/docs", ".." + "/shared")

URL = re.compile(r"https?://\S+")
TOKEN = re.compile(r"[A-Za-z0-9_./-]+\.md\b")
PATTERN_BEFORE = set("*<>{}$%")  # a token right after one of these is part of a file-name pattern
SECTIONS = re.compile(r"\A[\s#*(]*,?[\s#*(]*sections?\s+(\d+(?:\s*(?:-|–|,|and|or|to)\s*\d+)*)")
NAMED = re.compile(r"\A,\s*(?:section\s+)?([\"'])([^\"'\n]{2,80})\1")
NUMBERED_HEADING = re.compile(r"^#{1,6}\s+(\d+)\.", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def scanned_files(root: Path = ROOT) -> list[Path]:
    files = set()
    for folder, pattern in SCANNED:
        base = root / folder
        if base.is_dir():
            files |= {p for p in base.glob(pattern) if p.is_file() and "__pycache__" not in p.parts}
    return sorted(files)


def resolve(token: str, source: Path, root: Path = ROOT) -> Path | None:
    """The existing file inside ``root`` that ``token`` names, or None."""
    for base in (root, root / "docs", source.parent):
        path = (base / token).resolve()
        if path.is_file() and path.is_relative_to(root.resolve()):
            return path
    return None


def numbers(text: str) -> set[int]:
    """'3 and 4' -> {3, 4}; '1-3 and 5' -> {1, 2, 3, 5}."""
    out = set()
    for a, b in re.findall(r"(\d+)(?:\s*(?:-|–|to)\s*(\d+))?", text):
        out |= set(range(int(a), int(b or a) + 1))
    return out


def problems(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the markdown references of one file (empty when nothing)."""
    text = path.read_text(errors="replace")
    rel = path.relative_to(root)
    where = lambda pos: f"{rel}:{text.count(chr(10), 0, pos) + 1}"  # noqa: E731
    found = []
    for bad in FORBIDDEN:
        for m in re.finditer(re.escape(bad), text):
            found.append(f"{where(m.start())}: mentions {bad!r}: the project's docs must stand alone")
    scan = URL.sub(lambda m: " " * len(m.group()), text)  # URLs are not file references
    for m in TOKEN.finditer(scan):
        token = m.group()
        if m.start() > 0 and scan[m.start() - 1] in PATTERN_BEFORE:
            continue
        target = resolve(token.removeprefix("./"), path, root)
        if target is None:
            found.append(f"{where(m.start())}: {token} is not a file of this repository")
            continue
        after = scan[m.end():m.end() + 200]
        doc = target.read_text(errors="replace")
        if sec := SECTIONS.match(after):
            have = {int(n) for n in NUMBERED_HEADING.findall(doc)}
            for n in sorted(numbers(sec.group(1)) - have):
                found.append(f"{where(m.start())}: {token} has no section {n} (its numbered sections: "
                             f"{sorted(have) or 'none'})")
        elif named := NAMED.match(after):
            if not any(named.group(2) in h for h in HEADING.findall(doc)):
                found.append(f"{where(m.start())}: {token} has no heading {named.group(2)!r}")
    return found


FILES = scanned_files()


def test_the_scan_covers_the_code_templates_and_docs():
    rel = {str(p.relative_to(ROOT)) for p in FILES}
    assert "README.md" in rel and "docs/variants.md" in rel and "tests/test_doc_links.py" in rel
    assert any(r.endswith(".j2") for r in rel) and any(r.startswith("attngen/") for r in rel)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_references_resolve(path):
    found = problems(path)
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------------
# the scanner itself: it flags what it should and passes what it should
# ---------------------------------------------------------------------------------------------
def md(text: str) -> str:
    """The examples below write '@' for the markdown suffix, so that this file names no document itself."""
    return text.replace("@", ".md")


def test_scanner_flags_missing_files_sections_headings_and_outside_pointers(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / md("guide@")).write_text("# Guide\n\n## 1. First\n\n## 2. Second\n\n## Named part\n")
    (tmp_path / "pkg").mkdir()
    src = tmp_path / "pkg" / "mod.py"
    outside = ".." + "/shared" + md("/docs/brief@")
    src.write_text(md(
        '"""See nowhere/missing@ and brief@.\n'              # 1: two missing files
        "docs/guide@ section 7, docs/guide@ sections 1-3\n"  # 2: sections 7 and 3 do not exist
        'guide@, "No such part" and docs/guide@, "Named part"\n'  # 3: a heading that does not exist
        f"{outside}\n"                                        # 4: outside the repository
        '"""\n'))
    found = problems(src, tmp_path)
    assert any(md("pkg/mod.py:1: nowhere/missing@ is not a file") in f for f in found)
    assert any(md("pkg/mod.py:1: brief@ is not a file") in f for f in found)
    assert any("no section 7" in f for f in found) and any("no section 3" in f for f in found)
    assert not any("no section 1 " in f or "no section 2 " in f for f in found)
    assert any("no heading 'No such part'" in f for f in found)
    assert not any("'Named part'" in f for f in found)
    assert sum("pkg/mod.py:4" in f for f in found) == 3  # two forbidden mentions and an unresolved file
    assert len(found) == 8, "\n".join(found)


def test_scanner_passes_good_references(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / md("guide@")).write_text("# Guide\n\n## 4. Fourth\n")
    (tmp_path / md("README@")).write_text("x\n")
    src = tmp_path / "docs" / md("other@")
    src.write_text(md("[guide](guide@), docs/guide@ section 4, guide@ (section 4), ../README@, ./README@,\n"
                      "https://example.org/elsewhere@, bench/results/<date>-cpu-<name>@, *-cpu-decode@,\n"
                      "{name}@, the suffix \"@\"\n"))
    assert problems(src, tmp_path) == []
