"""README's two fresh-machine commands: CI runs the second one verbatim."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())
    assert len(commands) >= 2 and "moco compile" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_every_moco_name_the_readme_shows_exists():
    """Each dotted ``moco_compile...`` name in README.md imports (a module) or resolves (an attribute)."""
    import importlib

    missing = []
    for name in sorted(set(re.findall(r"moco_compile(?:\.[A-Za-z_]\w*)+", (ROOT / "README.md").read_text()))):
        parts = name.split(".")
        for split in range(len(parts), 0, -1):
            try:
                value = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attribute in parts[split:]:
                value = getattr(value, attribute, missing)
            if value is missing:
                missing.append(name)
            break
    assert missing == []
