"""Writing benchmark figures into benchmarks/RESULTS.md, one section per benchmark.

A section is found by its ``## title`` heading wherever it sits and only it is rewritten: the file's order and
its preamble (headline table, contents) are kept by hand, and a new title is appended at the end."""
from __future__ import annotations

import platform
import re
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_description() -> str:
    import onnxruntime

    from moco_compile.runtime.profile_target import cpu_name

    return (f"{cpu_name()}, {platform.system()} {platform.machine()}, Python "
            f"{platform.python_version()}, onnxruntime {onnxruntime.__version__}, {date.today()}")


def _section_pattern(title: str) -> re.Pattern:
    """The ``## title`` section of RESULTS.md, up to the next section; group 1 is its body."""
    return re.compile(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", re.S | re.M)


def write_section(title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = _section_pattern(title)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


def write_subsections(title: str, intro: str, subsections: dict[str, str]) -> None:
    """Rewrite the ``## title`` section of RESULTS.md as ``intro`` and its ``### key: ...`` subsections, those
    in ``subsections`` (key -> body starting with its ``### key:`` line) replacing or joining the ones already
    there, the others kept as they are, in their order."""
    match = _section_pattern(title).search(RESULTS.read_text()) if RESULTS.exists() else None
    parts = re.split(r"^(?=### )", match.group(1), flags=re.M)[1:] if match else []
    kept = {part[4:].split(":", 1)[0]: part.strip() for part in parts}
    kept.update({key: body.strip() for key, body in subsections.items()})
    write_section(title, "\n\n".join([intro.strip(), *kept.values()]))
