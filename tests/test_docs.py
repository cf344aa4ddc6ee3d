"""The documentation's links: README.md and docs/*.md point at files and headings that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where a link is a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def github_anchor(heading: str) -> str:
    """The #fragment GitHub gives a heading: lowercased, punctuation dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on ``page``; a repeated one also as GitHub numbers it (``-1``, ``-2``, ...)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        anchor = base = github_anchor(heading)
        n = 0
        while anchor in found:
            n += 1
            anchor = f"{base}-{n}"
        found.add(anchor)
    return found


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked offline
            continue
        path, _, fragment = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            bad.append(f"{target}: no file {where}")
        elif fragment and (where.suffix != ".md" or fragment not in anchors(where)):
            bad.append(f"{target}: no heading #{fragment} in {where.name}")
    return bad


def test_github_anchor_follows_githubs_rules():
    assert github_anchor("Many processes, and surviving faults") == "many-processes-and-surviving-faults"
    assert (github_anchor("The embedded default's assembled model (`mmllm eval`, seen / held-out combinations)")
            == "the-embedded-defaults-assembled-model-mmllm-eval-seen--held-out-combinations")


def test_every_relative_link_in_the_docs_leads_to_a_file_and_heading_that_exist():
    assert len(PAGES) > 5
    links = sum(len(LINK.findall(prose(page.read_text()))) for page in PAGES)
    assert links > len(PAGES)
    bad = {page.relative_to(REPO).as_posix(): broken_links(page) for page in PAGES}
    assert not {page: links for page, links in bad.items() if links}


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# Title, here\n\n[ok](#title-here) [x](b.md) [y](a.md#nowhere) `[no](c.md)`\n")
    assert broken_links(tmp_path / "a.md") == [f"b.md: no file {tmp_path / 'b.md'}",
                                               "a.md#nowhere: no heading #nowhere in a.md"]


def test_the_readme_links_every_docs_page():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in LINK.findall(prose(PAGES[0].read_text()))}
    assert set(PAGES[1:]) <= linked


def test_every_exit_code_the_docs_give_with_a_traceback_is_70():
    """An unexpected error exits 70 with its traceback (`mmllm --help`); distributed.md still said 1 for torch's
    CPU out-of-memory RuntimeError, the code of a failed request or a data problem."""
    import re

    said = [(page.name, code) for page in PAGES
            for code in re.findall(r"exit code (\d+),? with (?:the|its) traceback", page.read_text())]
    assert said and all(code == "70" for _, code in said), said


def test_the_titles_the_command_names_pages_by_are_the_pages_titles():
    """A wheel installs no docs/: `--help` and messages name a page by its title and file in the source repository
    (mmllm.locations.doc_page), which must be the page's own."""
    from mmllm.locations import DOC_TITLES

    titles = {page.name: page.read_text().splitlines()[0].removeprefix("# ") for page in PAGES[1:]}
    assert DOC_TITLES == titles
