"""The docs point at things that exist: every relative link and its anchor, and every
script, test file and test named in README.md, CONTRIBUTING.md and docs/*.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]

LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
NAMED_FILE = re.compile(r"\b((?:scripts|tests)/[\w/]+\.(?:py|sh))(?:::(\w+))?")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {anchor(h) for h in HEADING.findall(FENCE.sub("", markdown))}


def test_anchor_follows_githubs_rule():
    assert anchor("Measuring: scripts/bench_train.py") == "measuring-scriptsbench_trainpy"
    assert anchor("On a CPU with native bf16") == "on-a-cpu-with-native-bf16"
    assert anchors("# A b\n```\n# not a heading\n```\n## C, d\n") == {"a-b", "c-d"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_anchors_resolve(doc: Path):
    broken = []
    for target, fragment in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path = (doc.parent / target) if target else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path.read_text()):
            broken.append(f"{target}#{fragment}: no such heading")
    assert not broken, f"{doc.relative_to(REPO)}: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_named_scripts_and_tests_exist(doc: Path):
    missing = []
    for name, test in NAMED_FILE.findall(doc.read_text()):
        path = REPO / name
        if not path.exists():
            missing.append(name)
        elif test and not re.search(rf"^(?:def|class) {test}\b", path.read_text(), re.MULTILINE):
            missing.append(f"{name}::{test}")
    assert not missing, f"{doc.relative_to(REPO)} names what does not exist: {missing}"
