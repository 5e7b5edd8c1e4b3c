"""Every relative link and anchor of the README and docs/*.md resolves: a file that exists and, for
`#anchor`, a heading of that file (GitHub's anchor for it) or an explicit `<a id=…>`. Web links are
not fetched (tests run offline)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:


def prose_lines(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks, inline code spans removed."""
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(re.sub(r"(`+).*?\1", "", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the text without markup, lower case, punctuation dropped
    (letters, digits, '_', '-' and spaces stay), spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return [target for line in prose_lines(page) for target in LINK.findall(line) if not EXTERNAL.match(target)]


def test_the_checker_finds_what_it_should(tmp_path: Path) -> None:
    """Guard: slugs as GitHub makes them, code ignored, so that the check below is not vacuous."""
    assert slug("The real-world chain (`*-real` presets): tried five times, not shipped") == (
        "the-real-world-chain--real-presets-tried-five-times-not-shipped")
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n## Top\n\nSee [a](other.md#x), `[not](a-link.md)` and ![i](img.png \"t\").\n"
                    "```\n[nor](this.md)\n# not a heading\n```\n")
    assert links(page) == ["other.md#x", "img.png"]
    assert anchors(page) == {"top", "top-1"}
    assert len(links(ROOT / "README.md")) > 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / unquote(path)).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and unquote(anchor) not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)
