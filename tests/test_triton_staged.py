"""``moco export-triton --staged``: one model per stage and a BLS entry model, configs Triton's own
protobuf parses, stage graphs that chain to the single graph's outputs, and the user's models left
alone (``moco_compile.stage_models``, ``moco_compile.runtime.triton.staged``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2 as pb

from moco_compile import compile
from moco_compile.build import Build
from moco_compile.constants import EXIT_OUTPUT
from moco_compile.passes.graph.rewrite import apply_plan
from moco_compile.passes.planning.config import PlannerConfig
from moco_compile.prepare import model_for_plan
from moco_compile.runtime.triton.repository import PYTHON_MODEL
from moco_compile.runtime.triton.staged import ENTRY_MODEL
from tests.triton_helpers import export_cli, parsed_config, tree_hashes

OPTIONS = ["--max-batch-size", "16", "--preferred-batch-sizes", "4,16", "--max-queue-delay-us", "500", "--kind", "gpu",
           "--entry-instances", "3"]


@pytest.fixture(scope="module")
def staged(compiled, tmp_path_factory) -> Path:
    """The reference CNN's build (nested: its stages are cut from the plan applied again) exported staged."""
    repository = tmp_path_factory.mktemp("staged") / "repo"
    run = export_cli(compiled[1], "--repository", repository, "--name", "cnn", "--staged", "--backend", "python", *OPTIONS)
    assert run.exit_code == 0, run.output
    return repository


def test_every_model_is_a_config_triton_parses(compiled, staged):
    exits = len(compiled[0].plan.exits)
    assert sorted(p.name for p in staged.iterdir()) == ["cnn", *(f"cnn_stage{k}" for k in range(exits + 1))]
    entry, graph = parsed_config(staged / "cnn"), onnx.load(str(compiled[1] / "model.onnx")).graph
    assert (entry.name, entry.backend, entry.max_batch_size) == ("cnn", "python", 16)
    assert [t.name for t in entry.input] == ["images"] and [t.name for t in entry.output] == ["logits", EXIT_OUTPUT]
    assert list(entry.output[1].dims) == [1] and entry.output[1].HasField("reshape")
    assert (staged / "cnn" / "1" / "model.py").read_bytes() == ENTRY_MODEL.read_bytes()
    assert [(pb.ModelInstanceGroup.Kind.Name(g.kind), g.count) for g in entry.instance_group] == [("KIND_CPU", 3)]
    assert "intra_op_spinning" not in entry.parameters
    routing = json.loads(entry.parameters["moco_stages"].string_value)
    assert [stage["model"] for stage in routing] == [f"cnn_stage{k}" for k in range(exits + 1)]
    assert list(routing[0]["inputs"].values()) == [graph.input[0].name]
    for k, stage in enumerate(routing):
        config, model = parsed_config(staged / stage["model"]), onnx.load(str(staged / stage["model"] / "1" / "model.onnx"))
        assert (config.name, config.backend, config.max_batch_size) == (stage["model"], "python", 16)
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 16]
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        assert [(pb.ModelInstanceGroup.Kind.Name(g.kind), g.count) for g in config.instance_group] == [("KIND_GPU", 1)]
        assert config.parameters["intra_op_spinning"].string_value == "0"  # stages share the cores
        assert [t.name for t in config.input] == [v.name for v in model.graph.input] == list(stage["inputs"])
        assert [t.name for t in config.output] == [v.name for v in model.graph.output] == list(stage["outputs"])
        assert (staged / stage["model"] / "1" / "model.py").read_bytes() == PYTHON_MODEL.read_bytes()
        roles = set(stage["outputs"].values())
        if k < exits:  # what stage k carries is what stage k + 1 reads
            assert {"keep", "exited/logits"} <= roles
            assert {f"carry/{t}" for t in routing[k + 1]["inputs"].values()} == {r for r in roles if r.startswith("carry/")}
        else:
            assert roles == {"out/logits"}


def _chained(repository: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stage graphs of the staged export in ``repository`` run in turn on the rows that continue,
    as the entry model routes them: (logits, exits)."""
    routing = json.loads(parsed_config(repository / "cnn").parameters["moco_stages"].string_value)
    logits, exits = np.zeros((len(images), 10), np.float32), np.full(len(images), -2, np.int64)
    rows, tensors = np.arange(len(images)), {"images": images}
    for k, stage in enumerate(routing):
        session = ort.InferenceSession(str(repository / stage["model"] / "1" / "model.onnx"))
        outputs = dict(zip(stage["outputs"].values(), session.run(list(stage["outputs"]),
                                                                  {n: tensors[t] for n, t in stage["inputs"].items()})))
        if k == len(routing) - 1:
            logits[rows], exits[rows] = outputs["out/logits"], -1
            break
        keep = outputs["keep"]
        logits[rows[~keep]], exits[rows[~keep]] = outputs["exited/logits"][~keep], k
        rows = rows[keep]
        tensors = {role.split("/", 1)[1]: value[keep] for role, value in outputs.items() if role.startswith("carry/")}
    return logits, exits


def _assert_single_graph(model_path: Path, repository: Path, images: np.ndarray) -> None:
    expected = ort.InferenceSession(str(model_path)).run(["logits", EXIT_OUTPUT], {"images": images})
    logits, exits = _chained(repository, images)
    np.testing.assert_array_equal(exits, expected[1])
    assert len(set(exits.tolist())) >= 3
    np.testing.assert_allclose(logits, expected[0], rtol=1e-5, atol=1e-5)


def test_stage_models_chained_give_the_single_graph(compiled, staged, calibration):
    """A nested build: the stages of its plan applied again give its outputs and exits."""
    _assert_single_graph(compiled[1] / "model.onnx", staged, calibration["images"][-64:])


def test_a_bucketed_builds_stages_are_cut_from_its_graph(compiled, reference_model, calibration, tmp_path):
    result = compiled[0]
    model, output = model_for_plan(reference_model, None, {"images": calibration["images"][:1]})
    config = PlannerConfig(exit_layout="bucketed", batch_buckets=(1, 8))
    build = Build(apply_plan(model, result.plan, output, "bucketed", (1, 8)), result.plan, result.report, None,
                  exit_layout="bucketed", planner_config=config)
    build.save(tmp_path / "build")
    (tmp_path / "gone.onnx").write_bytes(b"")  # a bucketed build needs no original: a bad one is never read
    run = export_cli(tmp_path / "build", "--repository", tmp_path / "repo", "--name", "cnn", "--staged",
               "--original", tmp_path / "gone.onnx")
    assert run.exit_code == 0, run.output
    _assert_single_graph(compiled[1] / "model.onnx", tmp_path / "repo", calibration["images"][-64:])


def test_plan_without_an_exit_is_refused(tmp_path, calibration, reference_onnx):
    few = {k: v[:380] for k, v in calibration.items()}  # too few rows to certify: no exit
    compile(reference_onnx, few, out_dir=tmp_path / "build", allow_no_exit=True, measure_latency=False,
            show_progress=False)
    run = export_cli(tmp_path / "build", "--repository", tmp_path / "repo", "--staged")
    assert run.exit_code == 2 and "plan has no exit" in run.output and "without --staged" in run.output
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("force", [False, True])
def test_a_users_model_under_a_stage_name_is_left_alone(compiled, tmp_path, force):
    repository = tmp_path / "repo"
    user = repository / "cnn_stage1"
    (user / "1").mkdir(parents=True)
    (user / "config.pbtxt").write_text('name: "cnn_stage1"\nplatform: "onnxruntime_onnx"\n')
    (user / "1" / "model.onnx").write_bytes(b"the user's weights")
    before = tree_hashes(repository)
    run = export_cli(compiled[1], "--repository", repository, "--name", "cnn", "--staged", *(["--force"] if force else []))
    assert run.exit_code == 2 and f"{user} is not empty and is not a moco output" in " ".join(run.output.split())
    assert tree_hashes(repository) == before  # no other stage written either


def test_force_replaces_this_exports_models_only(compiled, staged, tmp_path):
    repository = tmp_path / "repo"
    other = repository / "other"
    (other / "1").mkdir(parents=True)
    (other / "1" / "model.onnx").write_bytes(b"the user's")
    users = tree_hashes(other)
    assert export_cli(compiled[1], "--repository", repository, "--name", "cnn").exit_code == 0  # a plain export first
    before = tree_hashes(repository)
    run = export_cli(compiled[1], "--repository", repository, "--name", "cnn", "--staged")
    assert run.exit_code == 2 and "holds a previous moco output; pass --force" in run.output
    assert tree_hashes(repository) == before
    run = export_cli(compiled[1], "--repository", repository, "--name", "cnn", "--staged", "--force", "--backend", "python",
               *OPTIONS)
    assert run.exit_code == 0, run.output
    assert sorted(p.name for p in repository.iterdir()) == sorted(p.name for p in staged.iterdir()) + ["other"]
    assert tree_hashes(other) == users
    assert {path: digest for path, digest in tree_hashes(repository).items() if not path.startswith("other")} == tree_hashes(staged)


@pytest.mark.parametrize("existing, name", [("staged", "cnn_stage1"), ("plain", "cnn")])
def test_names_that_clash_with_another_exports_models_are_refused_even_with_force(compiled, staged, tmp_path,
                                                                                  existing, name):
    """A staged export's entry over another export's stage, or its stage over another model: refused."""
    repository = tmp_path / "repo"
    first = "cnn" if existing == "staged" else "cnn_stage0"
    assert export_cli(compiled[1], "--repository", repository, "--name", first,
                *(["--staged"] if existing == "staged" else [])).exit_code == 0
    before = tree_hashes(repository)
    run = export_cli(compiled[1], "--repository", repository, "--name", name, "--staged", "--force")
    output = " ".join(run.output.split())
    assert run.exit_code == 2 and "the names clash" in output and "Choose another --name" in output
    clashing = "stage 1 of the staged export 'cnn'" if existing == "staged" else "the model 'cnn_stage0'"
    assert clashing in output
    assert tree_hashes(repository) == before


@pytest.mark.parametrize("option, value, message", [
    ("--preferred-batch-sizes", "4,0", "--preferred-batch-sizes takes comma-separated positive integers"),
    ("--preferred-batch-sizes", "128", "--preferred-batch-sizes 128 is larger than --max-batch-size 64"),
    ("--max-queue-delay-us", "-1", "--max-queue-delay-us must be a whole number of microseconds, 0 or more"),
    ("--entry-instances", "0", "--entry-instances must be a whole number of at least 1, not 0"),
])
def test_invalid_batching_options_are_refused_before_writing(compiled, tmp_path, option, value, message):
    run = export_cli(compiled[1], "--repository", tmp_path / "repo", "--staged", option, value)
    assert run.exit_code == 2 and message in " ".join(run.output.split())
    assert not (tmp_path / "repo").exists()


def test_an_original_that_is_not_the_compiled_model_is_refused(compiled, reference_model, tmp_path):
    """A nested build's stages come from its plan applied again: to another model, that is refused."""
    from models.onnx_heads import with_soft_probabilities

    other = tmp_path / "soft.onnx"
    onnx.save(with_soft_probabilities(reference_model, 4.0), str(other))
    run = export_cli(compiled[1], "--repository", tmp_path / "repo", "--staged", "--original", other)
    assert run.exit_code == 2 and "it is not the model the build was compiled from" in " ".join(run.output.split())
    assert not (tmp_path / "repo").exists()
