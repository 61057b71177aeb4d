"""Under CI=true a skipped test fails: the hook in conftest.py, run by pytest in a subprocess on a
throwaway test directory with a skip at collection, one by a marker and one while a test runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SKIPS = {
    "test_missing_import.py": 'import pytest\n\npytest.importorskip("moco_no_such_module")\n\n\n'
                              'def test_never_collected():\n    pass\n',
    "test_skip_inside.py": 'import pytest\n\n\ndef test_passes():\n    pass\n\n\n'
                           'def test_skips():\n    pytest.skip("no data here")\n\n\n'
                           '@pytest.mark.skip(reason="marked")\ndef test_marked():\n    pass\n',
}


def _pytest(directory: Path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    # past the collection error, so that the test skipped while running is reached too
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "."]
    return subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=120)


def test_skips_fail_only_when_ci_is_true(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    for name, text in SKIPS.items():
        (tmp_path / name).write_text(text)

    local = _pytest(tmp_path, ci=False)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "1 passed, 3 skipped" in local.stdout

    ci = _pytest(tmp_path, ci=True)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "skipped" not in ci.stdout.splitlines()[-1], ci.stdout  # nothing counted as a mere skip
    assert ("test_missing_import.py was skipped at collection (Skipped: could not import 'moco_no_such_module'"
            in ci.stdout)
    assert "test_skip_inside.py::test_skips was skipped in call (Skipped: no data here)" in ci.stdout
    assert "test_skip_inside.py::test_marked was skipped in setup (Skipped: marked)" in ci.stdout
