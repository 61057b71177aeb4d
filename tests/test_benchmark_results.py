"""benchmarks/results.py: a benchmark run on some references rewrites their subsections and keeps the others;
a section rewrite leaves the rest of RESULTS.md (headline table, contents, other sections) as it is."""
from __future__ import annotations

import re

from benchmarks import results


def test_write_subsections_replaces_and_appends_keeping_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    results.RESULTS.write_text("# Benchmark results\n\n## Text\n\nold intro\n\n### a: first\n\nA1\n\n"
                               "### b: second\n\nB1\n\n## Other\n\nkept\n")
    results.write_subsections("Text", "new intro", {"b": "### b: second\n\nB2", "c": "### c: third\n\nC1\n"})
    assert results.RESULTS.read_text() == (
        "# Benchmark results\n\n## Text\n\nnew intro\n\n### a: first\n\nA1\n\n### b: second\n\nB2\n\n"
        "### c: third\n\nC1\n\n## Other\n\nkept\n")
    results.write_subsections("New", "intro", {"a": "### a: x\n\nX"})
    assert results.RESULTS.read_text().endswith("## Other\n\nkept\n\n## New\n\nintro\n\n### a: x\n\nX\n")


PREAMBLE = ("# Benchmark results\n\nIntro.\n\n**Headline results**\n\n| area | figure | section |\n|---|---|---|\n"
            "| text | 1% | [Text](#text) |\n\n**Contents**\n\n- [Text](#text)\n- [Other](#other)\n\n")


def test_a_section_rewrite_keeps_the_headline_table_and_contents(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    results.RESULTS.write_text(PREAMBLE + "## Other\n\n> Stale: old.\n\nO1\n\n## Text\n\nintro\n\n### a: first\n\nA1\n")
    results.write_section("Other", "O2")
    results.write_subsections("Text", "intro", {"a": "### a: first\n\nA2"})
    results.write_section("New", "N1")
    assert results.RESULTS.read_text() == (
        PREAMBLE + "## Other\n\nO2\n\n## Text\n\nintro\n\n### a: first\n\nA2\n\n## New\n\nN1\n")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_the_contents_link_every_section_and_every_link_resolves():
    text = results.RESULTS.read_text()
    preamble = text.split("\n## ", 1)[0]
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    anchors = {_anchor(heading) for heading in re.findall(r"^#{2,3} (.+)$", text, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", preamble)
    assert [title for title in sections if _anchor(title) not in links] == []
    assert [link for link in links if link not in anchors] == []
