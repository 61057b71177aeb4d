"""``moco moe trace / fit-predictors / bench`` end to end on a tiny MoE, and their refusals."""
from __future__ import annotations

import json
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moco_compile.cli import app
from moco_compile.moe.reference_lm import load_model, reference_file
from tests.moe_helpers import tiny_model

TEXT = ("The film is a quiet, funny study of grief. Its actors carry a thin script; the ending lands. " * 12)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny MoE saved whole, calibration text and prompts, traced and fitted once."""
    root = tmp_path_factory.mktemp("moe")
    torch.save(tiny_model(), root / "model.pt")
    (root / "calib.txt").write_text(TEXT)
    (root / "prompts.txt").write_text("The film\nIts actors\n")
    runner = CliRunner()
    traced = runner.invoke(app, ["moe", "trace", str(root / "model.pt"), "--text", str(root / "calib.txt"),
                                 "--out", str(root / "trace"), "--window", "32"])
    assert traced.exit_code == 0, traced.output
    fitted = runner.invoke(app, ["moe", "fit-predictors", str(root / "trace"), "--out", str(root / "predictors")])
    assert fitted.exit_code == 0, fitted.output
    return root


def _bench(root, out, *extra):
    return CliRunner().invoke(app, ["moe", "bench", str(root / "model.pt"), "--predictors", str(root / "predictors"),
                                    "--prompts", str(root / "prompts.txt"), "--out", str(out), "--steps", "8",
                                    "--expert-mb", "1", "--bandwidth", "25", *extra])


def test_the_whole_chain_writes_hit_rates_tpot_and_a_page(chain):
    rates = json.loads((chain / "predictors" / "hit_rates.json").read_text())
    assert set(rates["hit_rates"]) == {"most_frequent", "previous_token", "speculative", "learned"}
    assert all(len(values) == 3 and all(0 <= v <= 1 for v in values) for values in rates["hit_rates"].values())
    assert len(rates["by_distance"]) == 3  # one token ahead of the 3-layer model
    run = _bench(chain, chain / "bench")
    assert run.exit_code == 0, run.output
    bench = json.loads((chain / "bench" / "bench.json").read_text())
    tpot = {row["policy"]: row["tpot_ms"] for row in bench["tpot"]}
    assert len(tpot) == 12 and tpot["all resident"] < tpot["LRU cache"] < tpot["on-demand"]
    assert tpot["offline optimum (Belady)"] <= tpot["LRU cache"]
    assert bench["settings"]["cache slots per layer"] == 4 and bench["settings"]["transfer ms per expert"] == 0.04
    page = (chain / "bench" / "report.html").read_text()
    assert 'id="plot-hit-rate"' in page and 'id="plot-tpot"' in page and 'id="hit-rates"' in page
    assert "of the gap LRU -&gt; optimum" in page and "next token, layer 0" in page
    again = _bench(chain, chain / "bench")  # never replaced without --force
    assert again.exit_code == 2 and "--force" in again.output


def test_bench_refuses_a_cache_smaller_than_top_k(chain, tmp_path):
    run = _bench(chain, tmp_path / "bench", "--cache", "1")
    assert run.exit_code == 2 and "cannot hold the 2 experts" in run.output
    assert not (tmp_path / "bench").exists()


def test_predictors_of_another_model_are_refused(chain, tmp_path):
    other = tiny_model()
    other.blocks = other.blocks[:2]
    torch.save(other, tmp_path / "two_layers.pt")
    run = CliRunner().invoke(app, ["moe", "bench", str(tmp_path / "two_layers.pt"), "--predictors",
                                   str(chain / "predictors"), "--prompts", str(chain / "prompts.txt"),
                                   "--out", str(tmp_path / "bench")])
    assert run.exit_code == 2 and "num_layers 3 vs 2" in run.output


def test_trace_refuses_a_model_without_moe_layers(chain, tmp_path):
    torch.save(torch.nn.Sequential(torch.nn.Embedding(256, 8)), tmp_path / "dense.pt")
    run = CliRunner().invoke(app, ["moe", "trace", str(tmp_path / "dense.pt"), "--text", str(chain / "calib.txt"),
                                   "--out", str(tmp_path / "trace")])
    assert run.exit_code == 2 and "no mixture-of-experts layers" in run.output
    np.testing.assert_equal((tmp_path / "trace").exists(), False)


def test_the_shipped_reference_runs_by_name_and_as_shipped(tmp_path):
    runner = CliRunner()
    traced = runner.invoke(app, ["moe", "trace", "--reference", "moe_lm", "--out", str(tmp_path / "trace"),
                                 "--max-windows", "40"])  # its shipped calibration text by default
    assert traced.exit_code == 0, traced.output
    assert "2,560 tokens x 4 MoE layers (8 experts, top-2)" in " ".join(traced.output.split())  # wrapped at 80
    shipped = runner.invoke(app, ["moe", "trace", str(reference_file("moe_lm", "weights")), "--text",
                                  str(reference_file("moe_lm", "calibration")), "--out", str(tmp_path / "again"),
                                  "--max-windows", "2"])  # the shipped file as MODEL: weights, not a pickle
    assert shipped.exit_code == 0, shipped.output
    fitted = runner.invoke(app, ["moe", "fit-predictors", str(tmp_path / "trace"), "--out", str(tmp_path / "p"),
                                 "--lookahead", "1", "--max-rows", "1000"])
    assert fitted.exit_code == 0, fitted.output
    run = runner.invoke(app, ["moe", "bench", "--reference", "moe_lm", "--predictors", str(tmp_path / "p"),
                              "--out", str(tmp_path / "bench"), "--steps", "3", "--expert-mb", "352"])
    assert run.exit_code == 0, run.output
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert bench["settings"]["prompts"] == 16  # the shipped prompt set
    tpot = {row["policy"]: row for row in bench["tpot"]}
    assert tpot["offline optimum (Belady)"]["tpot_ms"] <= tpot["LRU cache"]["tpot_ms"]


def test_a_whole_module_save_of_the_reference_names_the_installed_package(tmp_path):
    torch.save(load_model(), tmp_path / "whole.pt")
    with zipfile.ZipFile(tmp_path / "whole.pt") as saved:
        pickled = b"".join(saved.read(name) for name in saved.namelist() if name.endswith(".pkl"))
    assert b"moco_compile.moe.reference_lm" in pickled and b"models.moe_lm" not in pickled


@pytest.mark.parametrize("arguments, message", [
    (["model.pt", "--reference", "moe_lm"], "not both"),
    ([], "one of them"),
    (["--reference", "moe_lm2"], "unknown reference model 'moe_lm2'; moco ships moe_lm"),
    (["state.pt"], "holds a dict, not a torch module"),
])
def test_trace_says_what_model_to_give(tmp_path, arguments, message):
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pt")
    (tmp_path / "model.pt").write_bytes(b"")
    run = CliRunner().invoke(app, ["moe", "trace", *[str(tmp_path / a) if a.endswith(".pt") else a
                                                       for a in arguments], "--text", str(tmp_path / "state.pt"),
                                   "--out", str(tmp_path / "trace")])
    assert run.exit_code == 2 and message in " ".join(run.output.split()), run.output


def test_trace_of_a_users_model_needs_its_text(chain, tmp_path):
    run = CliRunner().invoke(app, ["moe", "trace", str(chain / "model.pt"), "--out", str(tmp_path / "trace")])
    assert run.exit_code == 2 and "give --text" in run.output


def test_the_reference_files_are_package_data():
    """A plain `pip install` carries only what pyproject's package-data names: every shipped reference file."""
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moco_compile.moe"]
    package = root / "moco_compile" / "moe"
    shipped = [reference_file("moe_lm", kind) for kind in ("weights", "calibration", "prompts")]
    assert all(path.is_file() and any(path.relative_to(package).match(glob) for glob in globs) for path in shipped)


def test_fit_predictors_refuses_a_lookahead_past_one_token(chain, tmp_path):
    run = CliRunner().invoke(app, ["moe", "fit-predictors", str(chain / "trace"), "--out", str(tmp_path / "p"),
                                   "--lookahead", "4"])
    assert run.exit_code == 2 and "--lookahead must be 1..3" in run.output
    assert not (tmp_path / "p").exists()
