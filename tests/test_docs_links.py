"""Every relative link and image in the documentation resolves: the file exists inside the repository,
and a `#anchor` names a heading of the target page under GitHub's anchor rules.

README.md is a front page that sends the reader to docs/ and slurm/README.md by topic, so a renamed
heading or a moved page breaks the way in; this test is what keeps those links honest. Absolute URLs
(https:, mailto:) are not fetched: nothing outside the repository is reachable from the tests.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^\s{0,3}(```|~~~)")
ATX_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")   # "## C#" keeps its '#'; "## A ##" does not
CODE_SPAN = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)\1", re.DOTALL)   # may wrap, never past a blank line
INLINE_LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # text may wrap
REFERENCE_DEF = re.compile(r"^[ ]{0,3}\[[^\]\n]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+\"[^\"\n]*\")?[ \t]*$", re.MULTILINE)
HTML_ATTR = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")
GITHUB_LINE_ANCHOR = re.compile(r"^L\d+(-L\d+)?$")


def doc_files(root: Path = ROOT) -> list[Path]:
    """The pages this test covers: the front page, every docs/ page and the Slurm page."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "slurm" / "README.md"]


def prose(text: str) -> str:
    """The text with fenced code blocks blanked (lines kept, so line numbers stay): a `# comment` in a
    bash block is no heading, and `[x](y)` there is no link."""
    out, fence = [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = m.group(1) if fence is None else None
            out.append("")
        else:
            out.append("" if fence else line)
    return "\n".join(out)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lowercased, every character that is not a
    letter, digit, '_', '-' or space removed, then each space turned into '-' (not collapsed)."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)               # `code` renders as its text
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)           # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)                               # inline HTML tags
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for line in prose(path.read_text(encoding="utf-8")).split("\n"):
        m = ATX_HEADING.match(line)
        if not m:
            continue
        slug = github_anchor(m.group(2))
        found.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image that is not an absolute URL."""
    # `[x](y)` inside a code span is not a link; blanking keeps the newlines, so line numbers stay
    text = CODE_SPAN.sub(lambda m: "\n" * m.group(0).count("\n"), prose(path.read_text(encoding="utf-8")))
    found = [(m.start(), m.group(2)) for m in INLINE_LINK.finditer(text)]
    found += [(m.start(), m.group(1)) for pattern in (HTML_ATTR, REFERENCE_DEF) for m in pattern.finditer(text)]
    return sorted((text.count("\n", 0, start) + 1, target) for start, target in found if not SCHEME.match(target))


def broken_links(pages: list[Path], root: Path) -> list[str]:
    """One line per link that does not resolve, naming the page, the line, the target and why."""
    problems = []
    cache: dict[Path, set[str]] = {}
    root = root.resolve()
    for page in (p.resolve() for p in pages):
        for number, target in relative_links(page):
            where = f"{page.relative_to(root)}:{number}: ({target})"
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / unquote(path_part)).resolve() if path_part else page
            if not dest.is_relative_to(root):
                problems.append(f"{where} points outside the repository")
                continue
            if not dest.exists():
                problems.append(f"{where} names a file that does not exist")
                continue
            if not anchor:
                continue
            if dest.suffix != ".md":
                if not GITHUB_LINE_ANCHOR.match(anchor):
                    problems.append(f"{where} has an anchor on a file that is not Markdown")
                continue
            if dest not in cache:
                cache[dest] = anchors(dest)
            if unquote(anchor) not in cache[dest]:
                problems.append(f"{where} names no heading of {dest.relative_to(root)}")
    return problems


# --------------------------------------------------------------------------------------------- the docs
def test_every_relative_link_and_anchor_resolves():
    pages = doc_files()
    for page in pages:
        assert page.is_file(), f"{page} is missing"
    problems = broken_links(pages, ROOT)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_reaches_every_docs_page():
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for _, t in relative_links(ROOT / "README.md")}
    unlinked = [p.name for p in doc_files()[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md links no page {unlinked}: a reader finds docs/ only through it"


def test_the_docs_images_are_linked():
    images = {p.name for p in (ROOT / "docs").glob("*.png")}
    linked = {Path(t).name for page in doc_files() for _, t in relative_links(page) if t.endswith(".png")}
    assert images and images <= linked, f"images in docs/ that no page shows: {sorted(images - linked)}"


# ------------------------------------------------------------------------------------------ the checker
@pytest.mark.parametrize("heading, anchor", [
    ("Pretrained image regions: `--image-encoder mobilenetv2`", "pretrained-image-regions---image-encoder-mobilenetv2"),
    ("Flags (names fixed; `--help` lists all)", "flags-names-fixed---help-lists-all"),
    ("The headline: the label-free recipe at 1,500 steps", "the-headline-the-label-free-recipe-at-1500-steps"),
    ("Earlier sweep: 750 steps, with the positive control (b230ed2)",
     "earlier-sweep-750-steps-with-the-positive-control-b230ed2"),
    ("C++ & `local_loss`", "c--local_loss"),
    ("See [the loss](loss.md) — α, β", "see-the-loss--α-β"),
])
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# Page\n\n## Cost: `--x` (measured)\n\n## Repeat\n\n## Repeat\n\n"
        "```bash\n# not a heading\n[not a link](missing-in-code.md)\n```\n", encoding="utf-8")
    (tmp_path / "docs" / "plot.png").write_bytes(b"\x89PNG")
    (tmp_path / "README.md").write_text(
        "# Front\n\n"
        "[good](docs/page.md#cost---x-measured) [dup](docs/page.md#repeat-1) ![img](docs/plot.png)\n"
        "[web](https://example.org/x.md#nowhere) `[code](nowhere.md)` [self](#front)\n"
        "[no file](docs/gone.md)\n"
        "[no heading](docs/page.md#not-a-heading-here)\n"
        "![no image](docs/missing.png)\n"
        "[code comment](docs/page.md#not-a-heading)\n"
        "[outside](../elsewhere.md)\n"
        "[bad self](#frontpage)\n"
        "a link whose text [wraps\nacross lines](docs/wrapped.md) and a code span `that wraps\n[x](gone-too.md)`\n"
        "[ref]: docs/gone-ref.md\n", encoding="utf-8")
    problems = broken_links([tmp_path / "README.md", tmp_path / "docs" / "page.md"], tmp_path)
    assert problems == [
        "README.md:5: (docs/gone.md) names a file that does not exist",
        "README.md:6: (docs/page.md#not-a-heading-here) names no heading of docs/page.md",
        "README.md:7: (docs/missing.png) names a file that does not exist",
        "README.md:8: (docs/page.md#not-a-heading) names no heading of docs/page.md",
        "README.md:9: (../elsewhere.md) points outside the repository",
        "README.md:10: (#frontpage) names no heading of README.md",
        "README.md:11: (docs/wrapped.md) names a file that does not exist",
        "README.md:14: (docs/gone-ref.md) names a file that does not exist",
    ]
