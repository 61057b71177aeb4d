"""benchmarks/results.py: a benchmark run on some references rewrites their subsections and keeps the others."""
from __future__ import annotations

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
