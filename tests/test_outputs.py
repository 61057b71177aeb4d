"""The user's files: moco never deletes or overwrites what it did not create (``moco_compile.outputs``).

Each refusal is checked for its message and for leaving the files byte for byte as they were.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from moco_compile import calibrate_frame, compile, load_frame
from moco_compile.cli import app
from moco_compile.errors import CalibrationDataError, ModelError, OutputError
from moco_compile.outputs import GENERATOR, MANIFEST, MARKS, check_output_file, staged_output_dir, written_by_moco
from moco_compile.reports.html_report import render_report
from tests.plan_settings import CHEAPEST_PLAN

ROWS = 1500
OUTPUT_FILES = ["frame.arrow", "model.onnx", "plan.json", "report.json"]


def _compile(model, calibration, out, **kwargs):
    return compile(model, calibration, out_dir=out, max_disagreement=0.02, allow_no_exit=True,
                   measure_latency=False, show_progress=False, planner_config=CHEAPEST_PLAN, **kwargs)


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the hash of its bytes ("dir" for directories)."""
    return {str(path.relative_to(root)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))}


def _leftovers(directory: Path) -> list[str]:
    """Staging, set-aside and partial files moco may have left in ``directory``."""
    return [path.name for path in directory.iterdir() if path.name.startswith(".")]


def _cli(*args: str):
    run = CliRunner().invoke(app, [str(arg) for arg in args])
    assert "Traceback" not in run.output
    return run


@pytest.fixture(scope="module")
def rows(calibration):
    return {name: values[:ROWS] for name, values in calibration.items()}


@pytest.fixture(scope="module")
def previous(compiled):
    """One real compile of the reference CNN written to a new directory: the suite's shared one."""
    return compiled


@pytest.fixture
def previous_output(previous, tmp_path) -> Path:
    """A previous moco output of this test's own: the module's compile saved to ``tmp_path/out``."""
    result, _ = previous
    return result.save(tmp_path / "out")


@pytest.fixture
def calib_npz(tmp_path, rows) -> Path:
    path = tmp_path / "data" / "calib.npz"
    path.parent.mkdir()
    np.savez(path, **rows)
    return path


def test_compile_lists_what_it_wrote_in_a_manifest(previous):
    _, out = previous
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES, MANIFEST])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["files"] == OUTPUT_FILES and manifest["generator"].startswith("moco ")


def test_directory_with_a_user_file_is_refused_before_the_work(tmp_path, reference_onnx):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    for force in (False, True):  # calibration {} would fail later: the output is checked first
        with pytest.raises(OutputError, match=f"{out} is not empty and is not a moco output .*{MANIFEST}"):
            _compile(reference_onnx, {}, out, force=force)
    assert _tree(tmp_path) == before


def test_cli_refuses_the_current_directory(tmp_path, reference_onnx, calib_npz, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    for extra in ([], ["--force"]):
        run = _cli("compile", reference_onnx, "--calib", calib_npz, "--out", ".", *extra)
        assert run.exit_code == 2
        assert "error: refusing to write the output into .: it is the current directory" in run.output
    assert _tree(tmp_path) == before


def test_home_directory_is_refused(previous, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".profile").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    result, _ = previous
    with pytest.raises(OutputError, match="it is your home directory"):
        result.save(home, force=True)
    assert _tree(home) == {".profile": hashlib.sha256(b"mine").hexdigest()}


def test_filesystem_root_is_refused(previous):
    result, _ = previous
    with pytest.raises(OutputError, match="refusing to write the output into /: it (is|contains) the current"):
        result.save("/", force=True)


def test_model_directory_is_refused_and_the_model_kept(tmp_path, reference_onnx):
    model = tmp_path / "models" / "net.onnx"
    model.parent.mkdir()
    shutil.copy(reference_onnx, model)
    before = _tree(tmp_path)
    for out in (model.parent, tmp_path):  # the model's directory and an ancestor of it
        with pytest.raises(OutputError, match=f"into {out}: it holds the input {model}"):
            _compile(model, {}, out, force=True)
    assert _tree(tmp_path) == before


def test_cli_refuses_the_calibration_file_directory(tmp_path, reference_onnx, calib_npz):
    before = _tree(tmp_path)
    run = _cli("compile", reference_onnx, "--calib", calib_npz, "--out", calib_npz.parent, "--force")
    assert run.exit_code == 2
    assert f"it holds the input {calib_npz}" in run.output
    assert _tree(tmp_path) == before


def test_existing_empty_directory_is_used(previous, tmp_path):
    result, _ = previous
    out = tmp_path / "empty"
    out.mkdir()
    result.save(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES, MANIFEST])
    assert _leftovers(tmp_path) == []


def test_previous_output_without_force_is_refused(previous, previous_output):
    result, _ = previous
    before = _tree(previous_output)
    with pytest.raises(OutputError, match="holds a previous moco output; pass --force"):
        result.save(previous_output)
    assert _tree(previous_output) == before


def test_user_file_in_a_previous_output_blocks_force(previous, previous_output):
    result, _ = previous
    (previous_output / "notes.txt").write_text("mine")
    (previous_output / "scratch").mkdir()
    before = _tree(previous_output)
    with pytest.raises(OutputError, match="also files moco did not write: notes.txt, scratch/; move them away"):
        result.save(previous_output, force=True)
    assert _tree(previous_output) == before


def test_manifest_not_written_by_moco_is_not_trusted(previous, tmp_path):
    result, _ = previous
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "victim.txt").write_text("mine")
    (out / MANIFEST).write_text(json.dumps({"generator": "moco", "files": ["../victim.txt"]}))
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match="is not a moco output"):
        result.save(out, force=True)
    assert _tree(tmp_path) == before


def _moco_files(kind: str, folder: Path) -> list[Path]:
    """Files of ``kind`` as moco's own writers write them."""
    from moco_compile.frame import FrameWriter
    from moco_compile.reports.html import page_html

    folder.mkdir()
    if kind == "frame":
        with FrameWriter(folder / "frame.arrow") as writer:
            writer.write({"x": np.arange(3), "y": np.ones((3, 2), np.float32)})
        return [folder / "frame.arrow"]
    if kind == "page":
        (folder / "page.html").write_text(page_html("a page", ["<p>body</p>"], ["a note"]), encoding="utf-8")
        return [folder / "page.html"]
    with staged_output_dir(folder / "out") as staging:  # the manifest moco lists its files in
        (staging / "a.txt").write_text("a")
    (folder / "evaluation.json").write_text(json.dumps({"generator": GENERATOR, "traffic_rows": 3}))
    return [folder / "out" / MANIFEST, folder / "evaluation.json"]


def _foreign_files(kind: str, folder: Path) -> list[Path]:
    """Files of ``kind`` moco did not write: unmarked, marked by another tool, damaged, empty."""
    import pyarrow as pa

    folder.mkdir()
    files = {"empty": b"", "text": b"mine\n", "binary": bytes(range(256))}
    if kind == "frame":
        for name, metadata in (("plain", None), ("other", {b"moco.generator": b"other tool 1.0"})):
            schema = pa.schema([("x", pa.int64())], metadata=metadata)
            with pa.ipc.new_file(str(folder / f"{name}.arrow"), schema) as writer:
                writer.write_batch(pa.RecordBatch.from_arrays([pa.array([1, 2])], schema=schema))
    elif kind == "page":
        files.update({"plain.html": b"<html><head><title>mine</title></head></html>",
                      "other.html": b'<html><head><meta name="generator" content="Hugo 0.1"></head></html>',
                      "late.html": b"<html>" + b" " * 2048 + b'<meta name="generator" content="moco 1">'})
    else:
        files.update({"plain.json": b'{"files": ["a.txt"]}', "other.json": b'{"generator": "other tool"}',
                      "list.json": b'["moco"]', "string.json": b'"moco"', "damaged.json": b'{"generator": "moco"'})
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(p for p in folder.iterdir())


@pytest.mark.parametrize("kind", sorted(MARKS))
def test_each_kind_of_file_moco_writes_is_recognised_and_a_foreign_one_is_not(kind, tmp_path):
    ours, foreign = _moco_files(kind, tmp_path / "ours"), _foreign_files(kind, tmp_path / "foreign")
    for path in ours:
        assert written_by_moco(path, kind), path
        check_output_file(path, kind, kind, force=True)  # moco may replace its own file
        for other in set(MARKS) - {kind}:
            assert not written_by_moco(path, other), (path, other)
    for path in foreign:
        assert not written_by_moco(path, kind), path
        before = path.read_bytes()
        with pytest.raises(OutputError, match="was not written by moco, which never overwrites"):
            check_output_file(path, kind, kind, force=True)
        assert path.read_bytes() == before
    assert not written_by_moco(tmp_path / "missing", kind)
    assert not written_by_moco(tmp_path, kind)  # a directory


@pytest.mark.slow
def test_force_replaces_a_previous_output_completely(previous_output, reference_onnx, calib_npz):
    render_report(previous_output)  # the page is listed in the manifest, so it may be replaced too
    (previous_output / "report.json").write_text("{}")
    run = _cli("compile", reference_onnx, "--calib", calib_npz, "--out", previous_output, "--force",
               "--max-disagreement", "0.02", "--allow-no-exit", "--no-latency", "--exit-heads", "linear")
    assert run.exit_code == 0, run.output
    report = json.loads((previous_output / "report.json").read_text())
    assert report["latency"] == {} and "latency" not in report["phases"]["seconds"]  # --no-latency skips it
    assert sorted(p.name for p in previous_output.iterdir()) == sorted([*OUTPUT_FILES, MANIFEST])
    assert json.loads((previous_output / MANIFEST).read_text())["files"] == OUTPUT_FILES
    assert json.loads((previous_output / "report.json").read_text())["bound"]["max_disagreement"] == 0.02
    onnx.checker.check_model(str(previous_output / "model.onnx"))
    assert len(load_frame(previous_output / "frame.arrow")) == ROWS
    assert _leftovers(previous_output.parent) == []


def test_failed_write_keeps_the_previous_output(previous, previous_output, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    result, _ = previous
    before = _tree(previous_output)
    monkeypatch.setattr(onnx, "save", full_disk)
    with pytest.raises(OutputError, match="could not write .*No space left on device.*nothing there was changed"):
        result.save(previous_output, force=True)
    assert _tree(previous_output) == before
    assert _leftovers(previous_output.parent) == []


def test_calibrate_refuses_to_overwrite_its_model(tmp_path, reference_onnx, calib_npz):
    model = tmp_path / "net.onnx"
    shutil.copy(reference_onnx, model)
    before = _tree(tmp_path)
    run = _cli("calibrate", model, "--calib", calib_npz, "--out", model, "--force")
    assert run.exit_code == 2
    assert f"error: {model} is an input of this command; give another path for the frame" \
        in run.output
    with pytest.raises(OutputError, match="is an input of this command"):
        calibrate_frame(model, {}, model, force=True, show_progress=False)
    assert _tree(tmp_path) == before


def test_calibrate_refuses_a_file_moco_did_not_write(tmp_path, reference_onnx):
    out = tmp_path / "data.arrow"
    out.write_text("mine")
    with pytest.raises(OutputError, match="exists and was not written by moco, which never overwrites"):
        calibrate_frame(reference_onnx, {}, out, force=True, show_progress=False)
    assert out.read_text() == "mine"


def test_calibrate_replaces_its_own_frame_only_with_force(tmp_path, reference_onnx, rows):
    sample = {name: values[:200] for name, values in rows.items()}
    out = tmp_path / "frame.arrow"
    calibrate_frame(reference_onnx, sample, out, show_progress=False)
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match="holds a frame moco wrote earlier; pass --force"):
        calibrate_frame(reference_onnx, sample, out, show_progress=False)
    assert _tree(tmp_path) == before
    frame = calibrate_frame(reference_onnx, {k: v[:100] for k, v in sample.items()}, out, force=True,
                            show_progress=False)
    assert len(frame) == len(load_frame(out)) == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frame.arrow"]


def test_report_refuses_to_overwrite_a_user_file(previous_output, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<html>mine</html>")
    run = _cli("report", previous_output, "--html", page, "--force")
    assert run.exit_code == 2
    assert "was not written by moco" in run.output
    assert page.read_text() == "<html>mine</html>"


def test_report_page_is_listed_and_replaced_only_with_force(previous_output):
    page = render_report(previous_output)
    assert page == previous_output / "report.html"
    assert "report.html" in json.loads((previous_output / MANIFEST).read_text())["files"]
    with pytest.raises(OutputError, match="holds a report page moco wrote earlier; pass --force"):
        render_report(previous_output)
    assert render_report(previous_output, force=True) == page
    assert _leftovers(previous_output) == []


def test_cli_reports_a_failed_write_without_traceback(previous_output, monkeypatch):
    def failing_replace(source, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", failing_replace)
    run = _cli("report", previous_output)
    assert run.exit_code == 2
    assert "error: could not write" in run.output and "Permission denied" in run.output
    assert not (previous_output / "report.html").exists() and _leftovers(previous_output) == []


def test_created_files_follow_the_umask(previous, tmp_path, reference_onnx, rows):
    result, _ = previous
    umask = os.umask(0o027)
    try:
        out = result.save(tmp_path / "new" / "out")
        page = render_report(out)
        frame = calibrate_frame(reference_onnx, {k: v[:100] for k, v in rows.items()}, tmp_path / "f.arrow",
                                show_progress=False)
    finally:
        os.umask(umask)
    assert len(frame) == 100
    for directory in (tmp_path / "new", out):
        assert directory.stat().st_mode & 0o777 == 0o750, directory
    for path in [*out.iterdir(), page, tmp_path / "f.arrow"]:
        assert path.stat().st_mode & 0o777 == 0o640, path


def _cuts_and_model(reference_onnx, rows):
    from moco_compile.prepare import cut_points_of
    from moco_compile.importer import import_model

    imported = import_model(reference_onnx)
    _, cuts = cut_points_of(imported, {k: v[:2] for k, v in rows.items()}, batch_size=2)
    return imported, cuts


def test_model_onnxruntime_cannot_load_is_a_model_error(tmp_path, reference_onnx, rows):
    from moco_compile.passes.calibration.calibrate import calibrate

    imported, cuts = _cuts_and_model(reference_onnx, rows)
    broken = onnx.ModelProto()
    broken.CopyFrom(imported.model)
    broken.graph.node.append(onnx.helper.make_node("NoSuchOp", [imported.output], ["unused"]))
    with pytest.raises(ModelError, match="onnxruntime cannot load the model .*NoSuchOp"):
        calibrate(broken, imported.output, cuts, [rows], tmp_path / "f.arrow", show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_onnxruntime_run_failure_is_a_calibration_error(tmp_path, reference_onnx, rows):
    from moco_compile.passes.calibration.calibrate import calibrate

    imported, cuts = _cuts_and_model(reference_onnx, rows)
    wrong = {"images": np.zeros((2, 1, 14, 14), np.float32)}
    with pytest.raises(CalibrationDataError, match=r"onnxruntime failed on calibration batch 0 .*float32\[2, 1, 14, 14\]"):
        calibrate(imported.model, imported.output, cuts, [wrong], tmp_path / "f.arrow", show_progress=False)
    assert list(tmp_path.iterdir()) == []
