"""``moco moe trace / fit-predictors / bench`` end to end on a tiny MoE, and their refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moco_compile.cli import app
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
    assert all(len(values) == 2 and all(0 <= v <= 1 for v in values) for values in rates["hit_rates"].values())
    run = _bench(chain, chain / "bench")
    assert run.exit_code == 0, run.output
    bench = json.loads((chain / "bench" / "bench.json").read_text())
    tpot = {row["policy"]: row["tpot_ms"] for row in bench["tpot"]}
    assert len(tpot) == 8 and tpot["all resident"] < tpot["LRU cache"] < tpot["on-demand"]
    assert bench["settings"]["cache slots per layer"] == 4 and bench["settings"]["transfer ms per expert"] == 0.04
    page = (chain / "bench" / "report.html").read_text()
    assert 'id="plot-hit-rate"' in page and 'id="plot-tpot"' in page and 'id="hit-rates"' in page
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
