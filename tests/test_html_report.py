"""``render_report``: the HTML page of a compile, read back with the stdlib HTML parser."""
from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser

import pytest

from moco_compile.errors import MocoError, NotACompileOutputError
from moco_compile.reports.html_report import render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"img", "meta", "br", "hr", "link", "input"}


class _Element:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: "_Element | None") -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[_Element] = []
        self.text = ""

    def find_all(self, tag: str | None = None, **attrs: str) -> list["_Element"]:
        found = []
        for child in self.children:
            if (tag is None or child.tag == tag) and all(child.attrs.get(k.rstrip("_").replace("_", "-")) == v
                                                         for k, v in attrs.items()):
                found.append(child)
            found += child.find_all(tag, **attrs)
        return found

    def find(self, tag: str | None = None, **attrs: str) -> "_Element":
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]

    @property
    def value(self):
        return json.loads(self.attrs["data-value"])


class _Tree(HTMLParser):
    """A minimal element tree (tags, attributes, text) built with ``html.parser``."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = _Element("#document", {}, None)
        self._open = self.root
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        element = _Element(tag, dict(attrs), self._open)
        self._open.children.append(element)
        if tag not in VOID:
            self._open = element

    def handle_startendtag(self, tag, attrs):
        self._open.children.append(_Element(tag, dict(attrs), self._open))

    def handle_endtag(self, tag):
        element = self._open
        while element is not self.root and element.tag != tag:
            element = element.parent
        assert element is not self.root, f"unmatched </{tag}>"
        self._open = element.parent

    def handle_data(self, data):
        element = self._open
        while element is not None:
            element.text += data
            element = element.parent


def _percent_text(element: _Element) -> float:
    text = element.text.strip()
    assert text.endswith("%"), text
    return float(text[:-1]) / 100


@pytest.fixture(scope="module")
def rendered(compiled, tmp_path_factory):
    """The page of the shared compile, written outside its directory (which other tests list)."""
    _, out = compiled
    target = tmp_path_factory.mktemp("html") / "page.html"
    path = render_report(out, target)
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    return path, _Tree(path.read_text(encoding="utf-8")).root, report, plan


def test_page_is_written_where_asked(rendered, compiled):
    path, _, _, _ = rendered
    _, out = compiled
    assert path.is_file() and path.name == "page.html"
    assert [p.name for p in path.parent.iterdir()] == ["page.html"]  # no temporary file left behind
    assert not (out / "report.html").exists()


def test_summary_numbers_read_back(rendered):
    _, page, report, _ = rendered
    summary = page.find("table", id="summary")
    for key in ("compute_reduction", "exit_rate", "disagreement", "accuracy_before", "accuracy_after"):
        cell = summary.find("td", id=key)
        assert cell.value == pytest.approx(report[key], abs=1e-12), key
        assert _percent_text(cell) == pytest.approx(report[key], abs=0.0005 + 1e-9), key
    assert summary.find("td", id="flops_per_row_original").value == report["flops_per_row_original"]
    assert summary.find("td", id="certified_budget").value == report["bound"]["max_disagreement"]


def test_certificate_numbers_read_back(rendered):
    _, page, report, _ = rendered
    bound = report["bound"]
    table = page.find("table", id="certificate")
    for key in ("max_disagreement", "confidence", "test_rows", "disagreements", "near_threshold_rows", "p_value",
                "estimated_disagreement_upper_bound", "chosen_plan", "plans_tested", "family_confidence"):
        assert table.find("td", id=f"bound_{key}").value == pytest.approx(bound[key]), key
    assert table.find("td", id="bound_method").text == bound["method"]
    assert table.find("td", id="bound_certified").text == bound["certified"]
    row = table.find("td", id="bound_estimated_disagreement_upper_bound").parent
    assert "an estimate, not certified" in row.text


def test_exited_confidence_and_traffic_scope_read_back(rendered):
    _, page, report, _ = rendered
    summary = page.find("table", id="summary")
    for key in ("mean_top_probability", "mean_top_probability_full_model", "mean_top_probability_uncalibrated",
                "ece", "ece_full_model"):
        assert summary.find("td", id=f"exited_{key}").value == pytest.approx(report["exited_confidence"][key]), key
    certificate = page.find("table", id="certificate")
    assert certificate.find("td", id="traffic_scope").text == report["traffic_scope"]
    assert "calibration rows" in report["traffic_scope"] and "--ood-guard" in report["traffic_scope"]


def test_exits_table_reads_back(rendered):
    _, page, report, plan = rendered
    table = page.find("table", id="exits")
    rows = table.find_all("tr", class_="exit-row")
    assert len(rows) == len(report["exits"]) > 0
    for row, item, planned in zip(rows, report["exits"], plan["exits"]):
        assert int(row.attrs["data-exit"]) == item["exit"]
        assert row.find("td", class_="module").text == item["module"]
        assert row.find("td", class_="tensor").text == item["tensor"]
        assert row.find("td", class_="pooling").text == planned["pooling"]
        rate = row.find("td", class_="exit_rate")
        assert rate.value == pytest.approx(item["exit_rate"], abs=1e-12)
        assert _percent_text(rate) == pytest.approx(item["exit_rate"], abs=0.0005 + 1e-9)
        assert row.find("td", class_="classes_enabled").value == item["classes_enabled"]
        assert row.find("td", class_="fraction_of_flops_before").value == \
            pytest.approx(item["fraction_of_flops_before"])
        assert row.find("td", class_="guard_rate").text == "-" and item["guard_rate"] is None  # built unguarded
    full = table.find("tr", class_="full-row")
    assert full.find("td", class_="exit_rate").value == pytest.approx(1 - report["exit_rate"])


def test_compile_time_reads_back_phase_by_phase(rendered):
    _, page, report, _ = rendered
    table = page.find("table", id="phases")
    for name, seconds in report["phases"]["seconds"].items():
        row = table.find("tr", data_phase=name)
        assert row.find("td", class_="seconds").value == pytest.approx(seconds)
        assert row.find("td", class_="share").value == pytest.approx(seconds / report["phases"]["total"])


def test_splits_and_verification_read_back(rendered):
    _, page, report, _ = rendered
    splits = page.find("table", id="splits")
    for name, rows in report["splits"].items():
        assert splits.find("tr", data_split=name).find("td", class_="rows").value == rows
    verification = page.find("table", id="verification")
    for key, value in report["verification"].items():
        if key != "scope":
            assert verification.find("td", id=f"verification_{key}").value == pytest.approx(value), key
    assert page.find("p", id="verification_scope").text == report["verification"]["scope"]
    assert f"the first {report['verification']['rows']} calibration rows" in verification.find("caption").text


def test_plots_are_embedded_pngs(rendered):
    _, page, report, _ = rendered
    images = page.find_all("img")
    # exit rates, cumulative compute, the Pareto curve, and one projection per exit
    assert len(images) == 3 + len(report["exits"])
    plots = [image.attrs["data-plot"] for image in images]
    assert plots[:3] == ["exit-rates", "cumulative-compute", "pareto"]
    assert plots[3:] == [f"projection-{k}" for k in range(len(report["exits"]))]
    prefix = "data:image/png;base64,"
    for image in images:
        assert image.attrs["src"].startswith(prefix)
        data = base64.b64decode(image.attrs["src"][len(prefix):], validate=True)
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert not page.find_all(id="notes")  # nothing was skipped


@pytest.fixture
def copy_without_frame(compiled, tmp_path):
    """The JSON outputs of the shared compile, without frame.arrow (and without the model)."""
    _, out = compiled
    target = tmp_path / "out"
    target.mkdir()
    for name in ("report.json", "plan.json"):
        shutil.copy(out / name, target / name)
    return target


def test_without_frame_projections_are_skipped_with_a_note(copy_without_frame):
    path = render_report(copy_without_frame)
    assert path == copy_without_frame / "report.html"
    assert sorted(p.name for p in copy_without_frame.iterdir()) == ["plan.json", "report.html", "report.json"]
    page = _Tree(path.read_text(encoding="utf-8")).root
    assert [image.attrs["data-plot"] for image in page.find_all("img")] == \
        ["exit-rates", "cumulative-compute", "pareto"]
    notes = page.find("ul", id="notes").text
    assert "frame.arrow" in notes and "skipped" in notes


def test_the_page_says_which_split_its_figures_come_from(copy_without_frame):
    """The shared compile (4,000 rows) has no report split: its figures are on the test rows, and
    nothing on the page says "report split"; a build with one says so, with its row count."""
    report = json.loads((copy_without_frame / "report.json").read_text())
    assert report["evaluated_on"] == "test" and not report["splits"]["report"]
    text = render_report(copy_without_frame).read_text(encoding="utf-8")
    measured = _Tree(text).root.find("p", id="measured_on")
    assert measured.attrs["data-split"] == "test" and "measured on the test split" in measured.text
    assert "flatter" in measured.text
    assert "report split" not in text.lower() and "report-split" not in text.lower()
    report.update(evaluated_on="report", evaluation_note="estimates on report rows that nothing was fitted or "
                  "certified on", splits={**report["splits"], "report": 5000})
    (copy_without_frame / "report.json").write_text(json.dumps(report))
    measured = _Tree(render_report(copy_without_frame, force=True).read_text(encoding="utf-8")).root.find(
        "p", id="measured_on")
    assert measured.attrs["data-split"] == "report" and "measured on the report split (5000 rows)" in measured.text


def test_text_is_escaped_and_latency_is_tabled(copy_without_frame):
    report = json.loads((copy_without_frame / "report.json").read_text())
    report["exits"][0]["module"] = "<script>alert(1)</script>"
    report["classifier_output"] = 'logits" onload="x'
    report["latency"] = {"batch_1": {"original_ms": 2.0, "compiled_ms": 1.5, "ratio": 0.75},
                         "batch_64": {"original_ms": 40.0, "compiled_ms": 24.0, "ratio": 0.6}}
    (copy_without_frame / "report.json").write_text(json.dumps(report))
    text = render_report(copy_without_frame).read_text(encoding="utf-8")
    assert "<script>" not in text and 'logits" onload' not in text
    page = _Tree(text).root
    assert page.find("tr", data_exit="0").find("td", class_="module").text == "<script>alert(1)</script>"
    assert page.find("dd", id="classifier_output").text == 'logits" onload="x'
    latency = page.find("table", id="latency")
    for name, timing in report["latency"].items():
        row = latency.find("tr", data_batch=name)
        for key, value in timing.items():
            assert row.find("td", class_=key).value == value
    assert page.find("td", id="latency_ratio_batch_64").value == 0.6
    assert not page.find_all("p", id="latency_note")  # faster at both sizes: nothing to warn about


def test_a_slower_build_shows_what_to_do(copy_without_frame):
    from moco_compile.api import latency_note

    report = json.loads((copy_without_frame / "report.json").read_text())
    report["latency"] = {"batch_1": {"original_ms": 0.05, "compiled_ms": 0.056, "ratio": 1.12}}
    report["latency_note"] = latency_note(report["latency"])
    (copy_without_frame / "report.json").write_text(json.dumps(report))
    page = _Tree(render_report(copy_without_frame).read_text(encoding="utf-8")).root
    assert page.find("p", id="latency_note").text == report["latency_note"]


def test_missing_outputs_give_a_clear_error(tmp_path):
    with pytest.raises(NotACompileOutputError, match="not a moco compile output.*moco compile") as caught:
        render_report(tmp_path)
    assert isinstance(caught.value, MocoError) and isinstance(caught.value, FileNotFoundError)
    assert "report.json" in str(caught.value) and "plan.json" in str(caught.value)
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(NotACompileOutputError, match="no plan.json"):
        render_report(tmp_path)
    with pytest.raises(NotACompileOutputError, match="does not exist"):
        render_report(tmp_path / "nowhere")
    assert not list(tmp_path.glob("*.html")) and not list(tmp_path.glob(".*partial"))


def test_damaged_json_is_a_moco_error(tmp_path):
    (tmp_path / "report.json").write_text("{not json")
    (tmp_path / "plan.json").write_text("{}")
    with pytest.raises(MocoError, match="not valid JSON"):
        render_report(tmp_path)


def test_cli_report_command_writes_the_page(compiled, tmp_path):
    from typer.testing import CliRunner

    from moco_compile.cli import app

    _, out = compiled
    page = tmp_path / "page.html"
    run = CliRunner().invoke(app, ["report", str(out), "--html", str(page)])
    assert run.exit_code == 0, run.output
    assert page.read_text().count("<img") >= 3
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "does not exist" in missing.output and "moco compile" in missing.output


_REPORT = {"classifier_output": "logits", "bound": {}, "compute_reduction": 0.3, "exit_rate": 0.4,
           "disagreement": 0.005, "exits": []}
_PLAN = {"total_flops": 1e6, "exits": [], "certificate": {"curve": []}}


def _report_cli(tmp_path, report, plan):
    """``moco report`` on a directory holding ``report`` and ``plan`` (objects, or text written as is)."""
    from typer.testing import CliRunner

    from moco_compile.cli import app

    for name, content in (("report.json", report), ("plan.json", plan)):
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    run = CliRunner().invoke(app, ["report", str(tmp_path)])
    return run, sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("report, plan, message", [
    ([_REPORT], _PLAN, r"report.json is not a moco report: it should be a JSON object, it is a list"),
    ({"name": "left-pad", "version": "1.3.0"}, _PLAN, r"report.json is not a moco report: it has no 'classifier_output'"),
    ({**_REPORT, "exits": [1, 2]}, _PLAN, r"report.json is not a moco report: 'exits' should be a list of objects"),
    ({**_REPORT, "exits": [{"exit_rate": "high"}]}, _PLAN, r"'exits\[0\].exit_rate' should be a number"),
    ({**_REPORT, "bound": 5}, _PLAN, r"report.json is not a moco report: 'bound' should be an object"),
    (_REPORT, {"exits": []}, r"plan.json is not a moco plan: it has no 'total_flops'"),
    (_REPORT, {**_PLAN, "certificate": "certified"}, r"plan.json is not a moco plan: 'certificate' should be an object"),
    (_REPORT, {**_PLAN, "certificate": {"curve": 3}}, r"'certificate.curve' should be a list of objects"),
    (_REPORT, '{"total_flops": 1e6,', r"plan.json is not valid JSON"),
    (b"\xff\xfe".decode("latin-1"), _PLAN, r"report.json is not valid JSON"),
], ids=["list", "foreign", "exits-not-objects", "exit-rate-text", "bound-number", "plan-missing-key",
        "certificate-text", "curve-number", "plan-truncated", "report-not-json"])
def test_cli_report_on_files_of_the_wrong_shape_says_so(tmp_path, report, plan, message):
    """Valid JSON of the wrong shape (or no JSON): `error: ...`, exit 2, no traceback, nothing written."""
    run, files = _report_cli(tmp_path, report, plan)
    assert run.exit_code == 2, run.output
    assert isinstance(run.exception, SystemExit) and "Traceback" not in run.output
    text = " ".join(run.output.split())
    assert text.startswith("error: ") and re.search(message, text), text
    assert "recompile with `moco compile" in text
    assert files == ["plan.json", "report.json"]


def test_cli_report_renders_the_least_report_it_accepts(tmp_path):
    """The shape check asks only for what a compile always writes: a bare report renders."""
    run, files = _report_cli(tmp_path, _REPORT, _PLAN)
    assert run.exit_code == 0, run.output
    assert files == ["plan.json", "report.html", "report.json"]


# -- damaged outputs fail loudly; expected gaps are noted on the page ---------------------------

@pytest.fixture
def copy_with_frame(copy_without_frame, compiled):
    """The JSON outputs of the shared compile and its frame (not the model)."""
    _, out = compiled
    shutil.copy(out / "frame.arrow", copy_without_frame / "frame.arrow")
    return copy_without_frame


def _edit_plan(edit):
    def damage(folder):
        plan = json.loads((folder / "plan.json").read_text())
        edit(plan)
        (folder / "plan.json").write_text(json.dumps(plan))
    return damage


def _truncate_frame(folder):
    data = (folder / "frame.arrow").read_bytes()
    (folder / "frame.arrow").write_bytes(data[: len(data) // 2])


def _foreign_frame(folder):
    (folder / "frame.arrow").write_text("not a frame")


DAMAGES = {
    "plan without total_flops": (_edit_plan(lambda plan: plan.pop("total_flops")), "plan.json is not a moco plan"),
    "plan exit without weights": (_edit_plan(lambda plan: plan["exits"].append({"cut": "x", "module": "x"})),
                                  "plan.json is not a moco plan"),
    "plan exits not a list": (_edit_plan(lambda plan: plan.update(exits="none")), "plan.json is not a moco plan"),
    "truncated frame": (_truncate_frame, "frame.arrow could not be read"),
    "foreign frame": (_foreign_frame, "frame.arrow could not be read"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_output_fails_loudly_and_writes_no_page(copy_with_frame, damage):
    from typer.testing import CliRunner

    from moco_compile.cli import app
    from moco_compile.errors import MocoError

    apply, named = DAMAGES[damage]
    apply(copy_with_frame)
    before = sorted(p.name for p in copy_with_frame.iterdir())
    with pytest.raises(MocoError, match=f"{named}.*compile"):
        render_report(copy_with_frame)
    run = CliRunner().invoke(app, ["report", str(copy_with_frame)])
    assert run.exit_code == 2, run.output
    assert "error:" in run.output and named in run.output and "Traceback" not in run.output
    assert sorted(p.name for p in copy_with_frame.iterdir()) == before  # no page, no partial file


def test_a_frame_without_predictions_is_plotted_unmarked_with_a_note(copy_with_frame):
    from moco_compile.constants import PREDICTIONS
    from moco_compile.frame import ActivationFrame, load_frame

    frame = load_frame(copy_with_frame / "frame.arrow")
    kept = ActivationFrame.from_arrays({name: frame[name] for name in frame.columns if name != PREDICTIONS})
    kept.save(copy_with_frame / "frame.arrow")
    page = _Tree(render_report(copy_with_frame).read_text(encoding="utf-8")).root
    plots = [image.attrs["data-plot"] for image in page.find_all("img")]
    assert plots[:3] == ["exit-rates", "cumulative-compute", "pareto"] and len(plots) > 3
    assert "not marked" in page.find("ul", id="notes").text
