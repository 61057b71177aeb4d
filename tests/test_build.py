"""``Build``: a build directory saved and loaded back, its record, and every kind of bad directory
refused with a clear error by ``Build.load`` and by the commands that read a build, nothing written."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moco_compile.build import Build, FRAME_ARROW, MODEL_ONNX, PLAN_JSON, REPORT_JSON
from moco_compile.cli import app
from moco_compile.errors import BuildError, MocoError, NotACompileOutputError
from moco_compile.outputs import MANIFEST
from moco_compile.passes.planning.config import PlannerConfig


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the hash of its bytes."""
    return {str(path.relative_to(root)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))}


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def _without(key: str):
    return lambda data: {k: v for k, v in data.items() if k != key}


@pytest.fixture
def build(compiled, tmp_path) -> Path:
    """A private copy of the shared compile's build directory."""
    _, out = compiled
    return Path(shutil.copytree(out, tmp_path / "build"))


@pytest.fixture(scope="module")
def traffic(tmp_path_factory, calibration) -> Path:
    path = tmp_path_factory.mktemp("traffic") / "traffic.npz"
    np.savez(path, images=calibration["images"][:16])
    return path


def test_a_build_loads_as_compile_returned_it_and_saves_again_byte_for_byte(compiled, build, tmp_path):
    result, _ = compiled
    loaded = Build.load(build)
    assert loaded.model is None and loaded.model_path == build / MODEL_ONNX and loaded.directory == build
    assert loaded.plan.to_dict() == result.plan.to_dict() and loaded.report == result.report
    assert (loaded.exit_layout, loaded.seed) == ("nested", 0)
    assert loaded.planner_config == result.planner_config and loaded.planner_config.exit_layout == "nested"
    assert len(loaded.frame) == len(result.frame)
    again = loaded.save(tmp_path / "again")
    assert _tree(again) == _tree(build)  # model copied, JSON and frame written as compile wrote them


def test_plan_json_records_the_resolved_planner_configuration_seed_and_layout(compiled):
    result, out = compiled
    plan = json.loads((out / PLAN_JSON).read_text())
    assert plan["exit_layout"] == "nested" and plan["seed"] == 0
    assert PlannerConfig.from_dict(plan["planner_config"]) == result.planner_config
    assert plan["planner_config"]["families"] == list(PlannerConfig().families)  # JSON lists, tuples again on load


def test_a_build_from_before_the_record_loads_nested_with_the_rest_unknown(build):
    for key in ("exit_layout", "seed", "planner_config"):
        _edit_json(build / PLAN_JSON, _without(key))
    loaded = Build.load(build)
    assert (loaded.exit_layout, loaded.seed, loaded.planner_config) == ("nested", None, None)


def test_a_build_without_its_frame_loads_without_one(build):
    (build / FRAME_ARROW).unlink()
    assert Build.load(build).frame is None


def _foreign(build: Path) -> None:
    for path in build.iterdir():
        path.unlink()
    (build / "notes.txt").write_text("mine")


BAD_BUILDS = {  # what is wrong -> (damage done to a copy of a good build, error, what the message says)
    "missing plan.json": (lambda b: (b / PLAN_JSON).unlink(), NotACompileOutputError,
                          "damaged moco build: it lacks plan.json, listed in its moco-manifest.json; compile again"),
    "plan.json a list": (lambda b: (b / PLAN_JSON).write_text("[1, 2]"), BuildError,
                         "plan.json is not a moco plan: it should be a JSON object, it is a list; it is damaged or "
                         "another program's file: recompile with `moco compile"),
    "plan.json without exits": (lambda b: _edit_json(b / PLAN_JSON, _without("exits")), BuildError,
                                "plan.json is not a moco plan: it has no 'exits'"),
    "plan.json with a bad layout": (lambda b: _edit_json(b / PLAN_JSON, lambda d: {**d, "exit_layout": "wide"}),
                                    BuildError, "exit_layout is 'wide', not one of nested, flat"),
    "report.json missing keys": (lambda b: _edit_json(b / REPORT_JSON, _without("bound")), BuildError,
                                 "report.json is not a moco report: it has no 'bound'; it is damaged or another "
                                 "program's file"),
    "report.json not JSON": (lambda b: (b / REPORT_JSON).write_text("{not json"), BuildError,
                             "report.json is not valid JSON"),
    "foreign directory": (_foreign, NotACompileOutputError,
                          "is not a moco build: it has no moco-manifest.json listing the files moco wrote there; "
                          "give the directory `moco compile"),
    "manifest missing": (lambda b: (b / MANIFEST).unlink(), NotACompileOutputError,
                         "is not a moco build: it has no moco-manifest.json"),
    "manifest not listing the plan": (
        lambda b: _edit_json(b / MANIFEST, lambda d: {**d, "files": [f for f in d["files"] if f != PLAN_JSON]}),
        NotACompileOutputError, "its moco-manifest.json does not list plan.json"),
    "a frame that does not load": (lambda b: (b / FRAME_ARROW).write_bytes(b"not arrow"), BuildError,
                                   "frame.arrow does not load as an activation frame"),
    "no directory": (lambda b: shutil.rmtree(b), NotACompileOutputError, "does not exist; give the directory "
                     "`moco compile"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUILDS))
def test_a_bad_build_is_refused_by_load_and_evaluate_saying_what_is_wrong(build, traffic, case):
    damage, error, message = BAD_BUILDS[case]
    damage(build)
    before = _tree(build) if build.exists() else None
    with pytest.raises(error) as caught:
        Build.load(build)
    assert message in str(caught.value) and isinstance(caught.value, MocoError)
    run = CliRunner().invoke(app, ["evaluate", str(build), "--traffic", str(traffic)])
    output = " ".join(run.output.split())
    assert run.exit_code == 2 and message in output and "Traceback" not in output, output
    assert (_tree(build) if build.exists() else None) == before  # nothing written


@pytest.mark.parametrize("case", ["missing plan.json", "plan.json a list", "report.json missing keys",
                                  "plan.json without exits"])
def test_moco_report_refuses_damaged_json_and_writes_nothing(build, case):
    damage, error, message = BAD_BUILDS[case]
    damage(build)
    for name in (MANIFEST, MODEL_ONNX, FRAME_ARROW):  # moco report reads a copy of the JSON files too
        (build / name).unlink(missing_ok=True)
    before = _tree(build)
    run = CliRunner().invoke(app, ["report", str(build)])
    output = " ".join(run.output.split())
    expected = "is not a moco compile output: it has no plan.json" if case == "missing plan.json" else message
    assert run.exit_code == 2 and expected in output and "Traceback" not in output, output
    assert _tree(build) == before


def test_a_loaded_build_without_its_graph_cannot_be_saved(build, tmp_path):
    loaded = Build.load(build)
    (build / MODEL_ONNX).unlink()
    with pytest.raises(BuildError, match="no compiled graph to save"):
        loaded.save(tmp_path / "again")
    assert not (tmp_path / "again").exists()
