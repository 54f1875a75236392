"""The repository's documents resolve: every "DESIGN §N" names a section of docs/DESIGN.md, and every relative
link in README.md and docs/*.md names a file of the repository (and a heading of it, for ``#anchor`` links)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.repo_files import REPO_ROOT, checkout_files

DESIGN = REPO_ROOT / "docs" / "DESIGN.md"
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".yaml", ".yml", ".txt", ".cfg", ".ini", ""}

# "DESIGN §3", "DESIGN.md §3", "DESIGN §1 step 3", "DESIGN §1-2", "DESIGN §3.2"
CITATION = re.compile(r"DESIGN(?:\.md)?\s*§\s*(\d+)(?:\.(\d+))?(?:\s*-\s*(\d+))?(?:\s+step\s+(\d+))?")
SECTION_REF = re.compile(r"§\s*(\d+)(?:\.(\d+))?")  # inside DESIGN.md itself
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def repository_files() -> list[Path]:
    return [REPO_ROOT / name for name in checkout_files()]


def text_files() -> list[Path]:
    """Files that may cite DESIGN (this one is left out: its examples of the syntax are not citations)."""
    this = Path(__file__).resolve()
    return [
        p for p in repository_files() if (p.suffix in TEXT_SUFFIXES or p.name == "Makefile") and p.resolve() != this
    ]


def design_sections(text: str) -> dict[tuple[int, int | None], str]:
    """``(N, None)`` for "## N. title" and ``(N, M)`` for "### N.M title", each mapped to its body text."""
    heading = re.compile(r"^(##|###) (\d+)\.(\d+)?\.? ", re.MULTILINE)
    matches = list(heading.finditer(text))
    sections = {}
    for i, match in enumerate(matches):
        level, number, sub = match[1], int(match[2]), match[3]
        key = (number, int(sub) if level == "###" and sub else None)
        end = len(text)
        for later in matches[i + 1 :]:  # a section runs to the next heading of its level or above
            if later[1] == "##" or level == "###":
                end = later.start()
                break
        sections[key] = text[match.end() : end]
    return sections


def steps_of(body: str) -> set[int]:
    """Numbers of the top-level numbered list items of a section ("1. **Norm.** ...")."""
    return {int(m[1]) for m in re.finditer(r"^(\d+)\. ", body, re.MULTILINE)}


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    found, seen = set(), {}
    for match in re.finditer(r"^#{1,6} (.+)$", CODE.sub("", markdown), re.MULTILINE):
        base = slug(match[1])
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def test_design_sections_are_numbered_in_order():
    sections = design_sections(DESIGN.read_text())
    top = [n for n, sub in sections if sub is None]
    assert top == list(range(1, len(top) + 1)), top
    for n, sub in sections:
        if sub is not None:
            assert (n, None) in sections, (n, sub)


def test_every_design_citation_names_an_existing_section():
    sections = design_sections(DESIGN.read_text())
    citations, missing = 0, []
    for path in text_files():
        text = path.read_text(errors="replace")
        where = path.relative_to(REPO_ROOT)
        for match in CITATION.finditer(text):
            citations += 1
            number, sub, until, step = (int(g) if g else None for g in match.groups())
            line = text.count("\n", 0, match.start()) + 1
            wanted = [(number, None)] + ([(number, sub)] if sub else []) + ([(until, None)] if until else [])
            missing += [f"{where}:{line}: {match[0]!r}: no section {key}" for key in wanted if key not in sections]
            if step is not None and (number, None) in sections and step not in steps_of(sections[(number, None)]):
                missing.append(f"{where}:{line}: {match[0]!r}: section {number} has no step {step}")
    assert missing == []
    assert citations >= 40, f"only {citations} citations found: is the pattern still right?"


def test_design_refers_only_to_its_own_sections():
    text = DESIGN.read_text()
    sections = design_sections(text)
    refs = [(int(m[1]), int(m[2]) if m[2] else None) for m in SECTION_REF.finditer(text)]
    assert refs, "DESIGN.md refers to none of its sections"
    assert [ref for ref in refs if ref not in sections] == []


@pytest.mark.parametrize("document", ["README.md", *sorted(p.name for p in (REPO_ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(document):
    path = REPO_ROOT / document if document == "README.md" else REPO_ROOT / "docs" / document
    text = CODE.sub("", path.read_text())
    files = {p.resolve() for p in repository_files()}
    broken = []
    for match in LINK.finditer(text):
        target = match[1]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path.resolve()
        if linked.is_dir():
            if not any(f.is_relative_to(linked) for f in files):
                broken.append(f"{target}: a folder with no file of the repository")
            continue
        if linked not in files:
            broken.append(f"{target}: no such file in the repository")
            continue
        if anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: {linked.name} has no heading #{anchor}")
    assert broken == [], f"{document}: {broken}"


def test_checks_can_fail(tmp_path):
    """The helpers above reject what they must: a missing section, a missing step, a broken anchor."""
    sections = design_sections("## 1. A\n\n1. **x**\n2. **y**\n\n### 1.1 Sub\n\ntext\n\n## 2. B\n\nz\n")
    assert set(sections) == {(1, None), (1, 1), (2, None)}
    assert steps_of(sections[(1, None)]) == {1, 2}
    assert "Sub" not in sections[(2, None)] and "z" not in sections[(1, None)]
    assert [m.groups() for m in CITATION.finditer("DESIGN §1 step 3, DESIGN §1-2, DESIGN.md §3.2")] == [
        ("1", None, None, "3"),
        ("1", None, "2", None),
        ("3", "2", None, None),
    ]
    assert anchors("# Title\n## 7. Why torchtitan 0.2.2\n## Title\n```\n# not a heading\n```\n") == {
        "title",
        "7-why-torchtitan-022",
        "title-1",
    }
