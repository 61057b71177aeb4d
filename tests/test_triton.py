"""``moco export-triton``: a Triton model repository entry whose config matches the graph, and the
user's files left alone (``moco_compile.runtime.triton.repository``)."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb
from tritonclient.utils import np_to_triton_dtype

from moco_compile.errors import MocoError, ModelError, OutputError
from moco_compile.outputs import MANIFEST
from moco_compile.runtime.session import CUDA_OPTIONS
from moco_compile.runtime.triton.repository import (PYTHON_MODEL, TensorSpec, TritonSettings, _config_text, config_message,
                                         export_triton, model_name, tensor_spec)
from tests.triton_helpers import export_cli, parsed_config, tree_hashes


def _expected_tensors(values) -> list[tuple[str, str, list[int]]]:
    """(name, Triton data type, dims without the batch axis) of graph inputs or outputs, from
    tritonclient's own numpy-to-Triton type table."""
    expected = []
    for value in values:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim[1:]]
        expected.append((value.name, "TYPE_" + np_to_triton_dtype(dtype), dims))
    return expected


def _declared(tensors) -> list[tuple[str, str, list[int]]]:
    """(name, data type, shape the model sees) of config inputs or outputs."""
    return [(t.name, pb.DataType.Name(t.data_type), list(t.reshape.shape) if t.HasField("reshape") else list(t.dims))
            for t in tensors]


@pytest.fixture
def build(compiled) -> Path:
    return compiled[1]


@pytest.fixture
def user_model(tmp_path) -> Path:
    """A model of the user's own in the repository: config and weights, no moco manifest."""
    model_dir = tmp_path / "repo" / "resnet"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text('name: "resnet"\nplatform: "onnxruntime_onnx"\n')
    (model_dir / "1" / "model.onnx").write_bytes(b"the user's weights")
    return model_dir


def test_onnxruntime_export_declares_the_graph(build, tmp_path):
    target = export_triton(build, tmp_path / "repo", "cnn", TritonSettings(max_batch_size=32, instances=3))
    config, graph = parsed_config(target), onnx.load(str(build / "model.onnx")).graph
    assert (config.name, config.platform, config.backend, config.max_batch_size) == ("cnn", "onnxruntime_onnx", "", 32)
    assert _declared(config.input) == _expected_tensors(graph.input)
    assert _declared(config.output) == _expected_tensors(graph.output)
    assert [o.name for o in config.output][-1] == "moco_exit"
    exit_output = config.output[-1]
    assert (list(exit_output.dims), exit_output.HasField("reshape"), list(exit_output.reshape.shape)) == ([1], True, [])
    assert [(g.count, pb.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(3, "KIND_CPU")]
    assert list(config.dynamic_batching.preferred_batch_size) == [32]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert (target / "1" / "model.onnx").read_bytes() == (build / "model.onnx").read_bytes()
    assert json.loads((target / MANIFEST).read_text())["files"] == ["1/model.onnx", "config.pbtxt"]


def test_python_export_declares_the_same_io_and_ships_model_py(build, tmp_path):
    target = export_triton(build, tmp_path / "repo", "cnn_py",
                           TritonSettings(max_batch_size=8, instances=2, kind="gpu", backend="python"))
    config, graph = parsed_config(target), onnx.load(str(build / "model.onnx")).graph
    assert (config.backend, config.platform, config.max_batch_size) == ("python", "", 8)
    assert _declared(config.input) == _expected_tensors(graph.input)
    assert _declared(config.output) == _expected_tensors(graph.output)
    assert config.parameters["exit_output"].string_value == "moco_exit"
    assert [(g.count, pb.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(2, "KIND_GPU")]
    assert (target / "1" / "model.py").read_bytes() == PYTHON_MODEL.read_bytes()
    assert (target / "1" / "model.onnx").read_bytes() == (build / "model.onnx").read_bytes()
    declared = next(line for line in PYTHON_MODEL.read_text().splitlines() if line.startswith("CUDA_OPTIONS = "))
    assert ast.literal_eval(declared.split("=", 1)[1].strip()) == CUDA_OPTIONS  # model.py cannot import moco


@pytest.mark.parametrize("backend", ["onnxruntime", "python"])
def test_hand_written_config_is_the_protobuf_config(backend):
    inputs = [TensorSpec("input_ids", "TYPE_INT64", (-1,)), TensorSpec('odd "name"\\', "TYPE_BOOL", (3, -1))]
    outputs = [TensorSpec("logits", "TYPE_FP16", (2,)), TensorSpec("moco_exit", "TYPE_INT64", (1,), ())]
    settings = TritonSettings(max_batch_size=16, instances=2, kind="gpu", backend=backend,
                              preferred_batch_sizes=(16, 4), max_queue_delay_us=0)
    parameters = {"exit_output": "moco_exit", "moco_stages": json.dumps([{"model": 'a "b"\\c'}])}
    by_hand = text_format.Parse(_config_text("text", inputs, outputs, settings, parameters), pb.ModelConfig())
    assert by_hand == config_message("text", inputs, outputs, settings, parameters)
    assert list(by_hand.dynamic_batching.preferred_batch_size) == [4, 16]
    assert json.loads(by_hand.parameters["moco_stages"].string_value) == [{"model": 'a "b"\\c'}]


def test_dynamic_axes_are_minus_one_and_a_fixed_batch_axis_is_refused():
    dynamic = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT32, ["batch", "sequence", 4])
    assert tensor_spec(dynamic) == TensorSpec("ids", "TYPE_INT32", (-1, 4))
    fixed = onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 8, 8])
    with pytest.raises(ModelError, match="'images' has a fixed batch axis of size 1.*dynamic batch axis"):
        tensor_spec(fixed)


def test_default_name_is_the_build_directory_made_valid(build, tmp_path):
    run = export_cli(build, "--repository", tmp_path / "repo")
    assert run.exit_code == 0, run.output
    assert parsed_config(tmp_path / "repo" / build.name).name == build.name
    assert [model_name(Path(p)) for p in ("my build (v2)", ".hidden", "--")] == ["my_build_v2_", "hidden", "model"]


def test_directory_that_is_not_a_moco_build_is_refused(build, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copyfile(build / "model.onnx", plain / "model.onnx")  # a model, but no manifest
    for directory in (plain, tmp_path / "missing"):
        run = export_cli(directory, "--repository", tmp_path / "repo")
        assert run.exit_code == 2 and "error:" in run.output and str(directory) in run.output
    assert "is not a moco build" in export_cli(plain, "--repository", tmp_path / "repo").output
    assert not (tmp_path / "repo").exists()


def test_build_without_an_exit_output_is_refused(build, tmp_path, reference_onnx):
    fake = tmp_path / "fake"
    shutil.copytree(build, fake)
    shutil.copyfile(reference_onnx, fake / "model.onnx")  # the original graph under a moco manifest
    with pytest.raises(ModelError, match="has no 'moco_exit' output"):
        export_triton(fake, tmp_path / "repo")


@pytest.mark.parametrize("force", [False, True])
def test_another_model_under_the_name_is_left_alone(build, user_model, force):
    repository = user_model.parent
    sibling = repository / "other"
    export_triton(build, repository, "other")
    before = tree_hashes(repository)
    run = export_cli(build, "--repository", repository, "--name", "resnet", *(["--force"] if force else []))
    assert run.exit_code == 2 and "is not a moco output" in run.output
    assert tree_hashes(repository) == before and (sibling / "config.pbtxt").exists()


def test_a_moco_build_under_the_name_is_not_replaced(build, tmp_path):
    repository = tmp_path / "repo"
    shutil.copytree(build, repository / "cnn")
    before = tree_hashes(repository)
    with pytest.raises(OutputError, match="holds another moco output, not a Triton export"):
        export_triton(build, repository, "cnn", force=True)
    assert tree_hashes(repository) == before


def test_force_replaces_a_previous_export_only(build, user_model):
    repository = user_model.parent
    export_triton(build, repository, "cnn", TritonSettings(backend="python"))
    user_files = tree_hashes(user_model)
    run = export_cli(build, "--repository", repository, "--name", "cnn")
    assert run.exit_code == 2 and "holds a previous moco output; pass --force" in run.output
    run = export_cli(build, "--repository", repository, "--name", "cnn", "--force", "--instances", "4")
    assert run.exit_code == 0, run.output
    assert parsed_config(repository / "cnn").instance_group[0].count == 4
    assert sorted(p.relative_to(repository / "cnn").as_posix() for p in (repository / "cnn").rglob("*")) == \
        ["1", "1/model.onnx", "config.pbtxt", MANIFEST]  # the python model.py is gone
    assert tree_hashes(user_model) == user_files
    assert sorted(p.name for p in repository.iterdir()) == ["cnn", "resnet"]  # no staging left behind


def test_file_added_to_a_previous_export_blocks_force(build, tmp_path):
    target = export_triton(build, tmp_path / "repo", "cnn")
    (target / "2").mkdir()
    (target / "2" / "model.onnx").write_bytes(b"a second version of the user's")
    (target / "1" / "notes.txt").write_text("mine")
    before = tree_hashes(target)
    with pytest.raises(OutputError, match="files moco did not write: 1/notes.txt, 2/; move them away"):
        export_triton(build, tmp_path / "repo", "cnn", force=True)
    assert tree_hashes(target) == before


@pytest.mark.parametrize("option, value, message", [
    ("--max-batch-size", "0", "--max-batch-size must be a whole number of at least 1, not 0"),
    ("--instances", "-2", "--instances must be a whole number of at least 1, not -2"),
    ("--kind", "tpu", "--kind must be one of cpu, gpu, not 'tpu'"),
    ("--backend", "tensorrt", "--backend must be one of onnxruntime, python, not 'tensorrt'"),
    ("--name", "../escape", "'../escape' is not a valid Triton model name"),
])
def test_invalid_option_is_refused_before_writing(build, tmp_path, option, value, message):
    run = export_cli(build, "--repository", tmp_path / "repo", option, value)
    assert run.exit_code == 2 and message in " ".join(run.output.split())
    assert not (tmp_path / "repo").exists()


def test_settings_refuse_non_integers():
    with pytest.raises(MocoError, match="--max-batch-size must be a whole number"):
        TritonSettings(max_batch_size=np.float64(8.0))
