"""Conformance: architectures users write, both exporters, named and compiled end to end."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from models.zoo_export import ARCHITECTURES, EXPORTERS, export, input_names, model_inputs  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.constants import EXIT_OUTPUT  # noqa: E402
from moco_compile.errors import BudgetError  # noqa: E402
from moco_compile.importer import import_model  # noqa: E402
from moco_compile.passes.graph.rewrite import apply_plan  # noqa: E402
from moco_compile.passes.planning.config import PlannerConfig  # noqa: E402
from moco_compile.passes.planning.design import cut_elements, exit_overhead  # noqa: E402
from moco_compile.prepare import cut_points_of  # noqa: E402
from tests.plan_settings import UNPRICED_ONE_FAMILY  # noqa: E402

pytestmark = pytest.mark.slow  # the fast tier (`pytest -m "not slow"`) leaves this file out

ROWS = 1200


@functools.cache
def _built(architecture: str, exporter: str) -> tuple[torch.nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    module = ARCHITECTURES[architecture]().eval()
    return module, export(module, exporter)


@pytest.fixture(params=[(a, e) for a in ARCHITECTURES for e in EXPORTERS], ids="-".join)
def exported(request):
    architecture, exporter = request.param
    return architecture, exporter, *_built(architecture, exporter)


def _cut_names(model: onnx.ModelProto) -> list[str]:
    imported = import_model(model)
    _, cuts = cut_points_of(imported, model_inputs(imported.input_names, np.zeros((1, 1, 28, 28), np.float32)), 1)
    return [c.module for c in cuts]


def test_cut_names_are_unique_module_paths(exported):
    architecture, exporter, module, model = exported
    names = [name for name in _cut_names(model) if name]  # cuts outside every module go by tensor
    assert len(names) >= 2 and len(set(names)) == len(names)
    paths = dict(module.named_modules())
    # the legacy exporter calls a module's second use "<name>_1": unique, but no module path
    unreal = [n for n in names if n.split("[")[0] not in paths]
    assert unreal == ([] if (architecture, exporter) != ("reused-module", "legacy") else ["pool_1"])


@pytest.mark.parametrize("architecture", ["nested", "inline-vit", "densenet", "convnext"])
def test_both_exporters_name_the_cuts_alike(architecture):
    assert _cut_names(_built(architecture, "legacy")[1]) == _cut_names(_built(architecture, "dynamo")[1])


def test_legacy_scopes_of_nested_sequentials_are_whole_paths():
    assert _cut_names(_built("nested", "legacy")[1])[:2] == ["features.0.block.1", "features.1"]


def test_compiles_with_exits_and_verifies(exported, calibration):
    """Random weights: the full model's class is still a function of the input, and exits that
    match it on calibration rows must match it on fresh rows too (within the budget's reach)."""
    architecture, exporter, module, model = exported
    names = input_names(module)
    result = compile(model, model_inputs(names, calibration["images"][:ROWS]), max_disagreement=0.05,
                     measure_latency=False, show_progress=False, planner_config=UNPRICED_ONE_FAMILY)
    columns = [e.column for e in result.plan.exits]
    assert result.plan.exits and len(set(columns)) == len(columns)
    assert result.report["verification"]["rows"] > 0
    fresh = model_inputs(names, calibration["images"][ROWS:ROWS + 1000])
    compiled = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, exits = compiled.run(["logits", EXIT_OUTPUT], fresh)
    full, = original.run(["logits"], fresh)
    assert (exits >= 0).mean() > 0.2
    assert (logits.argmax(1) != full.argmax(1)).mean() <= 0.1
    try:  # the legacy exporter's flatten is a Reshape to [batch, C, -1], which fails on 0 rows
        original.run(["logits"], {name: values[:0] for name, values in fresh.items()})
        empty_ok = True
    except Exception:  # onnxruntime raises its own exception types
        empty_ok = False
    assert result.report["verification"]["empty_batch_checked"] == empty_ok


def test_flat_chain_gives_each_level_its_own_inferred_dims(calibration):
    """The legacy exporter's ViT declares dims shape inference made up (``unk__30``) that stand for the
    batch, on tensors before and after each exit. In a flat chain, where every level is one graph,
    onnxruntime took the shared name as an equal size and reused a buffer of the wrong row count (the
    compile failed its verification); each level now gets its own name, and the flat graph gives every
    row what the nested one does."""
    _, model = _built("inline-vit", "legacy")
    flat = compile(model, model_inputs(["images"], calibration["images"][:ROWS]), max_disagreement=0.05,
                   measure_latency=False, show_progress=False,
                   planner_config=dataclasses.replace(UNPRICED_ONE_FAMILY, exit_layout="flat"))
    assert "If" not in {node.op_type for node in flat.model.graph.node} and len(flat.plan.exits) >= 2
    declared = {v.name: [d.dim_param for d in v.type.tensor_type.shape.dim] for v in flat.model.graph.value_info}
    after_exit = [dims for name, dims in declared.items() if name.startswith("/blocks.2/")]
    assert after_exit and all(not d.startswith("unk__") or "@moco_rows_" in d for dims in after_exit for d in dims)
    nested = apply_plan(import_model(model).model, flat.plan, "logits", "nested")
    fresh = {"images": calibration["images"][ROWS:ROWS + 64]}
    results = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
               .run(["logits", EXIT_OUTPUT], fresh) for m in (flat.model, nested)]
    assert len(np.unique(results[0][1])) >= 3  # rows that go on past the first exits run the later levels
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)


def test_exits_that_cannot_pay_for_their_launches_are_not_built(calibration):
    """Each exit costs a fixed ~20 kernel launches per batch (PlannerConfig.exit_fixed_cost): on the
    0.23 MFLOP MLP no cut saves that much, so the build keeps the original graph (or says why), where
    pricing exits by their cut's size alone built one (1.6x the original's latency at batch 1)."""
    _, model = _built("mlp", "legacy")
    data = model_inputs(["images"], calibration["images"][:ROWS])
    result = compile(model, data, max_disagreement=0.05, allow_no_exit=True, measure_latency=False,
                     show_progress=False)
    assert result.plan.exits == [] and "no exit can pay for itself" in result.plan.certificate["reason"]
    assert "If" not in {node.op_type for node in result.model.graph.node}
    with pytest.raises(BudgetError, match="no exit can pay for itself"):
        compile(model, data, max_disagreement=0.05, measure_latency=False, show_progress=False)


def test_only_exits_that_can_pay_are_built(calibration):
    """On a 0.8 MFLOP net the late cuts cannot pay for an exit and the early ones can: the plan
    opens only exits where a row leaving costs less than the full network, overhead included."""
    _, model = _built("reused-module", "legacy")
    result = compile(model, model_inputs(["images"], calibration["images"][:ROWS]), max_disagreement=0.05,
                     measure_latency=False, show_progress=False)
    imported = import_model(model)
    _, cuts = cut_points_of(imported, model_inputs(["images"], np.zeros((1, 1, 28, 28), np.float32)), 1)
    overhead = exit_overhead(cut_elements([c.shape for c in cuts]), PlannerConfig())  # rules not counted: a superset
    saves = np.array([c.flops_before for c in cuts]) + overhead < result.plan.total_flops
    payable = {c.tensor for c, pays in zip(cuts, saves) if pays}
    assert 0 < len(payable) < len(cuts)
    assert result.plan.exits and {e.cut.tensor for e in result.plan.exits} <= payable


def test_readme_lists_exactly_the_conformance_suite():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Supported models")[1].split("\n## ")[0]
    listed = [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]
    assert listed == list(ARCHITECTURES)
