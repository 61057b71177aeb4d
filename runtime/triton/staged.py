"""Write a moco build's stages as Triton models, with an entry model that routes rows between them.

``export_stages(compiled, stages, repository, name)`` writes, for a plan of E exits::

    REPOSITORY/NAME/                 the entry model: python backend, BLS (runtime/triton/entry.py)
        config.pbtxt                 the compiled graph's inputs and outputs (moco_exit included),
        1/model.py                   parameters moco_stages (the routing, JSON) and exit_output
        moco-triton.json             which export and role this model is (below)
    REPOSITORY/NAME_stage<k>/        k = 0..E: stage k and its exit's rule
        config.pbtxt                 the stage graph's inputs and outputs, dynamic batching
        1/model.onnx                 the stage graph (it takes exactly the rows it is given)
        1/model.py                   --backend python: runtime/triton/model.py running onnxruntime
        moco-triton.json

Rules:

1. Every stage model batches on axis 0 (``max_batch_size`` > 0, dynamic batching with the settings'
   preferred sizes and queue delay), so Triton merges the continuing rows of different requests.
   The entry model has the same ``max_batch_size``: no stage ever receives more rows than that.
2. ``--backend`` and ``--kind`` apply to the stage models (Triton's onnxruntime backend, or model.py
   running onnxruntime); the entry is always a python model on the CPU (Triton ensembles cannot
   branch; it only moves rows), ``--entry-instances`` of it.
3. A python stage model's onnxruntime threads do not spin-wait after a run (the config parameter
   ``intra_op_spinning: "0"``, read by model.py): the stages run one after another on the same cores,
   and a spinning idle stage starves the busy one (measured: the 6-block MiniLM's staged repository
   served twice as many rows at concurrency 16 on 2 cores without spinning).
4. ``moco-triton.json`` records the export (NAME) and role of each model it writes.  A model
   directory already there is replaced only with ``force``, only when it is a previous export of
   this NAME in the same place (the entry: any export named NAME; a stage: stage of NAME), and
   only as :func:`~moco_compile.outputs.staged_output_dir` allows; every directory is checked
   before the first is written.  Stages are written first, the entry last.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import onnx

from moco_compile.constants import EXIT_OUTPUT
from moco_compile.errors import MocoError, OutputError
from moco_compile.outputs import GENERATOR, check_output_dir, listed_files, staged_output_dir
from moco_compile.runtime.stage_graphs import StageGraph
from moco_compile.runtime.triton.repository import (CONFIG, EXIT_PARAMETER, MODEL, PYTHON_MODEL,
                                                    SPINNING_PARAMETER, VERSION, TritonSettings, check_previous_export,
                                                    checked_name, config_text, tensor_specs)

ENTRY_MODEL = Path(__file__).with_name("entry.py")
STAGES_PARAMETER = "moco_stages"  # the entry config's parameter listing the stages (JSON)
RECORD = "moco-triton.json"  # in each model directory of a staged export: its export and role
STAGE_PARAMETERS = {SPINNING_PARAMETER: "0"}  # rule 3


def stage_model_name(name: str, stage: int) -> str:
    """The Triton model name of stage ``stage`` of the staged export ``name``."""
    return f"{name}_stage{stage}"


def export_stages(compiled: onnx.ModelProto, stages: Sequence[StageGraph], repository: str | os.PathLike,
                  name: str, settings: TritonSettings = TritonSettings(), force: bool = False,
                  inputs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Write ``stages`` (stage 0 first, each taking exactly its rows) and an entry model serving
    ``compiled``'s inputs and outputs as the models ``name`` and ``name_stage<k>`` of ``repository``;
    returns their directories, the entry first.  ``inputs``: files whose directories must not be
    replaced (the build's model)."""
    name = checked_name(name)
    if len(stages) < 2:
        raise MocoError("a staged export needs a plan with at least one exit; this build has none: export it "
                        "without --staged")
    repository = Path(repository)
    entry = repository / name
    targets = [repository / stage_model_name(name, graph.stage) for graph in stages]
    for role, target in [("entry", entry), *(("stage", target) for target in targets)]:
        _check_target(target, name, role, inputs, force)
    for graph, target in zip(stages, targets):
        _write_stage(graph, target, name, settings, force, inputs)
    routing = [{"model": target.name, "inputs": dict(graph.gathers), "outputs": dict(graph.roles)}
               for graph, target in zip(stages, targets)]
    config = config_text(name, tensor_specs(compiled.graph.input, compiled.graph.initializer),
                         tensor_specs(compiled.graph.output), replace(settings, backend="python", kind="cpu", instances=settings.entry_instances),
                         {EXIT_PARAMETER: EXIT_OUTPUT, STAGES_PARAMETER: json.dumps(routing)})
    with staged_output_dir(entry, inputs, force) as staging:
        (staging / CONFIG).write_text(config, encoding="utf-8")
        (staging / VERSION).mkdir()
        shutil.copyfile(ENTRY_MODEL, staging / VERSION / "model.py")
        _write_record(staging, name, "entry", None)
    return [entry, *targets]


def _write_stage(graph: StageGraph, target: Path, name: str, settings: TritonSettings, force: bool,
                 inputs: Sequence[str | os.PathLike]) -> None:
    """One stage model's directory (rules 1 to 3)."""
    model = graph.model
    config = config_text(target.name, tensor_specs(model.graph.input, model.graph.initializer),
                         tensor_specs(model.graph.output), settings,
                         STAGE_PARAMETERS if settings.backend == "python" else None)
    with staged_output_dir(target, inputs, force) as staging:
        (staging / CONFIG).write_text(config, encoding="utf-8")
        (staging / VERSION).mkdir()
        onnx.save(model, str(staging / VERSION / MODEL))
        if settings.backend == "python":
            shutil.copyfile(PYTHON_MODEL, staging / VERSION / "model.py")
        _write_record(staging, name, "stage", graph.stage)


def _write_record(directory: Path, name: str, role: str, stage: int | None) -> None:
    record = {"generator": GENERATOR, "export": name, "role": role, "stage": stage}
    (directory / RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def _check_target(target: Path, name: str, role: str, inputs: Sequence[str | os.PathLike], force: bool) -> None:
    """Refuse ``target`` unless it may receive this export's ``role`` model (rule 4)."""
    check_previous_export(target)
    listed = listed_files(target) if target.is_dir() else None
    if listed is not None:
        owner = _record_of(target) if RECORD in listed else {"export": target.name, "role": "entry"}
        if (owner.get("export"), owner.get("role")) != (name, role):
            what = (f"stage {owner.get('stage')} of the staged export {owner.get('export')!r}"
                    if owner.get("role") == "stage" else f"the model {owner.get('export')!r}")
            raise OutputError(f"{target} holds {what}, and this export would write its {role} model there: the "
                              f"names clash; moco replaces only this export's own models, even with --force. "
                              "Choose another --name")
    check_output_dir(target, inputs, force)


def _record_of(target: Path) -> dict:
    """The export and role ``target``'s record names (empty when unreadable: then it matches nothing)."""
    try:
        record = json.loads((target / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
