"""A build's stages as standalone graphs, whatever its exit layout, and its staged Triton export.

The stage graphs are the exact-rows instances (bucket None) of the bucketed layout, cut out by
:func:`~moco_compile.runtime.stage_graphs.stage_graphs`:

1. A bucketed build (``--exit-layout bucketed``, ``--target cuda``) holds them: its model.onnx is cut.
2. Any other build (nested, flat) has its plan applied again, in memory, in the bucketed layout, to
   the model it was compiled from, prepared as compile prepared it
   (:func:`~moco_compile.prepare.model_for_plan`).  The same plan applied in the build's own layout
   must give the build's graph byte for byte, or the model is refused: it is not the one compiled.

The runtime cannot do this (it never imports the passes), so the staged export lives here.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from moco_compile.build import Build, recorded_output
from moco_compile.errors import MocoError, ModelError
from moco_compile.importer import load_original
from moco_compile.passes.graph.rewrite import apply_plan
from moco_compile.prepare import model_for_plan
from moco_compile.runtime.stage_graphs import BUCKETED, StageGraph, stage_graphs
from moco_compile.runtime.triton.repository import TritonSettings, model_name
from moco_compile.runtime.triton.staged import export_stages

CUT_BUCKETS = (1,)  # buckets of the in-memory bucketed graph: only its exact-rows instances are kept


def build_stage_graphs(build: Build, original: str | os.PathLike | None = None) -> list[StageGraph]:
    """The stages of ``build`` (a loaded build directory), stage 0 first, each a graph that takes
    exactly the rows it is given; ``original``: the model it was compiled from, when the build's
    record of it is gone or moved (rule 2)."""
    if not build.plan.exits:
        raise MocoError("the build's plan has no exit (it was compiled with --allow-no-exit and nothing could be "
                        "certified), so it has no stages: export it without --staged")
    if build.plan.agreement:
        raise MocoError("the build's plan routes rows with agreement (the 'patience' family: a row leaves only with "
                        "the class it had at the exit before), which staged serving does not carry between its stage "
                        "models: export it without --staged, or compile with --exit-layout bucketed (its families "
                        "leave 'patience' out)")
    compiled = onnx.load(str(build.model_path))
    if build.exit_layout == BUCKETED:
        graphs = stage_graphs(compiled, build.plan_record(), str(build.model_path))
    else:
        source = build.original_model(original)
        original_graph = load_original(source)
        prepared, output = model_for_plan(original_graph, recorded_output(build, original_graph, source),
                                          _one_row(compiled))
        if apply_plan(prepared, build.plan, output, build.exit_layout, build.batch_buckets).graph.SerializeToString(
                deterministic=True) != compiled.graph.SerializeToString(deterministic=True):
            raise ModelError(f"the build's plan applied again to {source} does not give the build's graph: it is not "
                             "the model the build was compiled from (pass --original with that one), or this model "
                             "needs its stages cut from a bucketed build (compile with --exit-layout bucketed)")
        bucketed = apply_plan(prepared, build.plan, output, BUCKETED, CUT_BUCKETS)
        record = {**build.plan_record(), "exit_layout": BUCKETED, "planner_config": {"batch_buckets": list(CUT_BUCKETS)}}
        graphs = stage_graphs(bucketed, record, str(build.model_path))
    return [graphs[(stage, None)] for stage in range(len(build.plan.exits) + 1)]


def export_triton_staged(build_dir: str | os.PathLike, repository: str | os.PathLike, name: str | None = None,
                         settings: TritonSettings = TritonSettings(), force: bool = False,
                         original: str | os.PathLike | None = None) -> list[Path]:
    """Write the build in ``build_dir`` as a staged Triton pipeline: the entry model ``name`` and one
    model per stage (:func:`~moco_compile.runtime.triton.staged.export_stages` has the layout);
    returns their directories, the entry first."""
    build = Build.load(build_dir)
    stages = build_stage_graphs(build, original)
    compiled = onnx.load(str(build.model_path))
    return export_stages(compiled, stages, repository, model_name(Path(build_dir)) if name is None else name,
                         settings, force, [build.model_path])


def _one_row(compiled: onnx.ModelProto) -> dict[str, np.ndarray]:
    """One row of zeros for each input of ``compiled`` (the original's inputs; 1 along dynamic axes):
    what preparing the model measures its shapes on (the graph check of rule 2 catches a preparation
    that these rows misled)."""
    weights = {initializer.name for initializer in compiled.graph.initializer}
    return {value.name: np.zeros([1, *(dim.dim_value or 1 for dim in value.type.tensor_type.shape.dim[1:])],
                                 onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
            for value in compiled.graph.input if value.name not in weights}
