"""The documentation stays connected: every relative link and anchor resolves, and no
page or code comment points at a document outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_REF = re.compile(r"docs/([a-z-]+\.md)(#[a-z0-9-]+)?")


def anchors(page: Path) -> set[str]:
    """GitHub-style anchors of a page's headings."""
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        found.add(slug)
    return found


def check(source: Path, target: str) -> str | None:
    path, _, anchor = target.partition("#")
    page = (source.parent / path).resolve() if path else source
    if not page.exists():
        return f"{source.name}: {target}: no such file"
    if anchor and page.suffix == ".md" and anchor not in anchors(page):
        return f"{source.name}: {target}: no such anchor"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    targets = [t for t in LINK.findall(text) if not t.startswith(("http://", "https://", "mailto:"))]
    broken = [problem for t in targets if (problem := check(page, t))]
    assert not broken, broken


def test_code_points_only_at_pages_that_exist() -> None:
    broken = []
    for path in [*(ROOT / "conveyor").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        for name, anchor in CODE_REF.findall(path.read_text()):
            target = f"{name}{anchor}"
            problem = check(ROOT / "docs" / "x.md", target)
            if problem:
                broken.append(f"{path.relative_to(ROOT)}: docs/{target}")
    assert not broken, broken


def test_nothing_points_outside_the_repository() -> None:
    outside = re.compile(r"\.\./shared|SPEC §|\bSPEC\b|FAULTS\.md|queue-module\.zh")
    found = []
    for path in [*PAGES, *(ROOT / "conveyor").rglob("*.py"), *(ROOT / "examples").rglob("*.*")]:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if outside.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, found
