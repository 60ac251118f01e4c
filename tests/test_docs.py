"""The documentation cannot drift: every relative link and #anchor in the README files and docs/*.md resolves, every page
of docs/ is in the README's index, and docs/cli.md names every command and option the CLI defines and holds the
reference that `python docs/make_cli_md.py` generates from the parser today."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md"]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK_TARGET = re.compile(r"\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")  # [text](target), ![alt](target)
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(\S+)")  # [name]: target
HTML_TARGET = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"""<[a-z]+\b[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence and (fenced is None or fence.group(1) == fenced):
            fenced = fence.group(1) if fenced is None else None
            continue
        if fenced is None:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (links as their text, code as its content), lowercased, with
    punctuation dropped except - and _, each space a -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = INLINE_CODE.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML renders as its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every #anchor a page has: its headings' slugs (the second of a slug gets -1, the third -2, ...) and the
    id/name of its HTML elements."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(text):
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
        out.update(HTML_ANCHOR.findall(line))
    return out


def link_targets(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code."""
    out = []
    for number, line in prose_lines(text):
        line = INLINE_CODE.sub("", line)
        for pattern in (LINK_TARGET, REFERENCE_DEFINITION, HTML_TARGET):
            out += [(number, target) for target in pattern.findall(line)]
    return out


def _shown(page: Path) -> str:
    """`page` as a path from the repository root (from its folder's parent outside the repository)."""
    root = ROOT if page.resolve().is_relative_to(ROOT) else page.parents[1]
    return page.resolve().relative_to(root.resolve()).as_posix()


def broken_links(page: Path) -> list[str]:
    """What does not resolve among `page`'s relative links: a missing file or folder, or an #anchor its target
    page does not have. Links with a scheme (https:, mailto:) are not followed."""
    problems = []
    for number, target in link_targets(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue
        path, _, anchor = target.partition("#")
        where = f"{_shown(page)}:{number}: {target}"
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            problems.append(f"{where}: no heading or element with that anchor in {resolved.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: _shown(p))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A `code` heading\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md#a-code-heading) [second of two](other.md#twice-1) [here](#page) ![img](other.md)\n"
        "[gone](missing.md) [no anchor](other.md#nothing) [third](other.md#twice-2) [self](#nowhere)\n"
        "`[in code](missing-too.md)` [web](https://example.com/x.md)\n"
        "```\n[in a block](missing-three.md)\n```\n")
    assert broken_links(page) == [
        "docs/page.md:4: missing.md: no such file",
        "docs/page.md:4: other.md#nothing: no heading or element with that anchor in other.md",
        "docs/page.md:4: other.md#twice-2: no heading or element with that anchor in other.md",
        "docs/page.md:4: #nowhere: no heading or element with that anchor in page.md",
    ]


def test_anchor_slugs_follow_githubs_rules():
    text = ("# Quick start\n## `dgemma generate`\n### CPU: dgemma against transformers 5.23!\n"
            "## The shipped model: dgemma-code-tiny\n## Quick start\n## [Linked](x.md) heading\n"
            '<a id="custom"></a>\n```\n# not a heading\n```\n')
    assert anchors(text) == {"quick-start", "dgemma-generate", "cpu-dgemma-against-transformers-523",
                             "the-shipped-model-dgemma-code-tiny", "quick-start-1", "linked-heading", "custom"}


def test_every_docs_page_is_in_the_readme_index():
    readme = ROOT / "README.md"
    linked = {(readme.parent / target.partition("#")[0]).resolve()
              for _, target in link_targets(readme.read_text(encoding="utf-8"))}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert missing == [], f"docs pages the README does not link to: {missing}"


# -- docs/cli.md ---------------------------------------------------------------------------------------

def _make_cli_md():
    spec = importlib.util.spec_from_file_location("make_cli_md", DOCS / "make_cli_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_md_names_every_command_and_option():
    make_cli_md = _make_cli_md()
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    missing = []
    for name, parser, _ in make_cli_md.commands(make_cli_md.build_parser()):
        if f"`{name}`" not in text:
            missing.append(name)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            missing += [f"{name} {option}" for option in action.option_strings if option not in text]
    assert missing == []


def test_cli_md_reference_is_what_the_parser_generates():
    make_cli_md = _make_cli_md()
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert make_cli_md.spliced(text) == text, "docs/cli.md is out of date: run python docs/make_cli_md.py"
