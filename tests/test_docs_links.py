"""Every relative link in README.md and docs/*.md leads somewhere in the repository: the file exists, and a
`#anchor` names a heading of the file it points to, slugged as GitHub slugs headings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from nodes_pack import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets and # are not markdown."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links and code marks dropped) in lower case, punctuation other than
    hyphens and underscores removed, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(document: Path) -> set[str]:
    """The anchors of a markdown file's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", document.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(document: Path) -> list[str]:
    text = prose(document.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(text) + REFERENCE_DEFINITION.findall(text)


def broken(document: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `document` that leads nowhere (or out of `root`), with why."""
    problems = []
    for target in links(document):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        path = (document.parent / path_part).resolve() if path_part else document
        if not path.is_relative_to(root):
            problems.append(f"{target}: outside the repository")
        elif not path.exists():
            problems.append(f"{target}: no such file")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            problems.append(f"{target}: no heading #{anchor} in {path.relative_to(root)}")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(document: Path) -> None:
    assert links(document), f"{document} links nowhere: is the link pattern still right?"
    assert broken(document) == []


def test_docs_index_lists_every_page() -> None:
    index = ROOT / "docs" / "README.md"
    listed = {(index.parent / target.partition("#")[0]).resolve() for target in links(index)}
    assert {page.resolve() for page in (ROOT / "docs").glob("*.md") if page != index} <= listed


def test_the_checker_finds_what_is_broken(tmp_path) -> None:
    """Broken links and anchors are reported; links in code, external links and good anchors are not."""
    (tmp_path / "other.md").write_text("# Weight modes: `memory`\n\n## Loading, ComfyUI's model management\n"
                                       "## Notes\n## Notes\n```\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#weight-modes-memory) [b](other.md#loading-comfyuis-model-management) "
                    "[c](other.md#notes-1) [d](https://example.com/x#y) `[e](missing.md)`\n"
                    "```\n[f](missing.md)\n```\n[g](missing.md) [h](other.md#not-a-heading) [i](#here) "
                    "![j](other.md#notes-2) [l](../outside.md)\n\n## Here\n[k]: other.md#nope\n")
    (tmp_path.parent / "outside.md").touch()
    found = [problem.split(":")[0] for problem in broken(page, tmp_path)]
    assert found == ["missing.md", "other.md#not-a-heading", "other.md#notes-2", "../outside.md", "other.md#nope"]
