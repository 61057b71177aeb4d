"""The bucketed exit layout: each stage runs at a fixed batch size (issue 26, items 1 and 2).

The reference CNN's certified plan laid out bucketed must route and score every row as the nested
graph does, while every Conv / MatMul / Gemm node instance sees one input shape over many batches
whose exit counts vary (onnxruntime's profiler records each node's input shapes per run).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from moco_compile.constants import instance_graph_name
from moco_compile.passes.graph.index import all_graphs, all_nodes, subgraph_nesting
from moco_compile.passes.graph.rewrite import apply_plan, insert_exits
from moco_compile.passes.planning.config import MAX_NESTED_GRAPHS
from tests.tiny_nets import calibrate_routes, deep_mlp, exits_at

BUCKETS = (1, 8, 16, 32, 64)
WEIGHTED_OPS = re.compile(r"Conv|MatMul|Gemm")
TAGGED = re.compile(r"moco_s\d+_b(\d+|N)")


def _session(model: onnx.ModelProto, profile_dir=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_dir / "bucketed")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def cnn(compiled, reference_model):
    """The shared compile's plan in the bucketed and the nested layout."""
    result, _ = compiled
    bucketed = apply_plan(reference_model, result.plan, "logits", "bucketed", BUCKETS)
    return result, bucketed


@pytest.fixture(scope="module")
def batches(calibration):
    """45 batches of 1 to 64 rows drawn from the calibration images: their exit counts vary."""
    rng = np.random.default_rng(5)
    images = calibration["images"]
    return [images[rng.choice(len(images), size=int(size), replace=False)]
            for size in rng.integers(1, max(BUCKETS) + 1, size=45)]


def test_every_weighted_node_instance_sees_one_shape_and_rows_match_nested(cnn, batches, tmp_path):
    result, bucketed = cnn
    session = _session(bucketed, tmp_path)
    nested = _session(result.model)
    counts = set()
    for images in batches:
        logits, exits = session.run(None, {"images": images})
        nested_logits, nested_exits = nested.run(None, {"images": images})
        np.testing.assert_array_equal(exits, nested_exits)
        np.testing.assert_array_equal(logits.argmax(1), nested_logits.argmax(1))
        np.testing.assert_allclose(logits, nested_logits, atol=1e-5, rtol=1e-5)
        counts.add(tuple(np.bincount(exits + 1, minlength=len(result.plan.exits) + 1)))
    assert len(counts) >= 40  # the rows continuing past each exit differ from batch to batch
    shapes = defaultdict(set)
    with open(session.end_profiling()) as profile:
        for event in json.load(profile):
            args = event.get("args", {})
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") \
                    and WEIGHTED_OPS.search(args.get("op_name", "")):
                shapes[event["name"]].add(json.dumps(args["input_type_shape"]))
    tagged = {name: seen for name, seen in shapes.items() if TAGGED.search(name)}
    assert tagged and len(tagged) == len(shapes)  # every weighted node runs inside a stage instance
    assert {name: seen for name, seen in tagged.items() if len(seen) > 1} == {}
    buckets_run = {int(TAGGED.search(name).group(1)) for name in tagged if not name.split("_b")[-1].startswith("N")}
    assert buckets_run == set(BUCKETS)


def test_instances_grow_as_stages_times_buckets_with_weights_stored_once(cnn, reference_model):
    result, bucketed = cnn
    stages = len(result.plan.exits) + 1
    names = {graph.name for graph in all_graphs(bucketed.graph)}
    expected = {instance_graph_name(stage, bucket) for stage in range(stages) for bucket in (*BUCKETS, None)}
    assert expected <= names
    assert sum(name.startswith("moco_stage") and "bucket" in name for name in names) == len(expected)
    node_names = [node.name for node in all_nodes(bucketed.graph)]
    assert len(node_names) == len(set(node_names)) and all(node_names)
    weights = {init.name: init for init in reference_model.graph.initializer}
    inner = [init for graph in list(all_graphs(bucketed.graph))[1:] for init in graph.initializer]
    assert not [init.name for init in inner if init.name in weights]
    top = {init.name for init in bucketed.graph.initializer}
    assert set(weights) <= top
    # every exit's rule weights once, not once per bucket
    rule_weights = [init.name for init in bucketed.graph.initializer if init.name.endswith("/weight")]
    assert len(rule_weights) == len(set(rule_weights)) == len(result.plan.exits)
    stored = sum(init.ByteSize() for graph in all_graphs(bucketed.graph) for init in graph.initializer)
    rules = sum(values.nbytes for exit_ in result.plan.exits for values in vars(exit_.scores).values()
                if isinstance(values, np.ndarray))  # a probe's weights, an MLP head's hidden layer too
    assert stored - sum(init.ByteSize() for init in reference_model.graph.initializer) < 2 * rules + 65536


def test_one_host_read_per_exit(cnn):
    """Each exit reads its continuing-row count once (NonZero); no Compress reads it again, and every
    skip and bucket choice is computed from that count's shape in the graph that reads it, where
    onnxruntime keeps it on the host (a condition computed in a subgraph from an outer-scope count
    would be computed on the device and read back: one more sync)."""
    result, bucketed = cnn
    ops = [node.op_type for node in all_nodes(bucketed.graph)]
    assert ops.count("NonZero") == len(result.plan.exits) and "Compress" not in ops
    home = {name: (graph.name, node) for graph in all_graphs(bucketed.graph) for node in graph.node
            for name in node.output}
    constants = {init.name for init in bucketed.graph.initializer}
    conditions = [node.input[0] for node in all_nodes(bucketed.graph) if node.op_type == "If"]
    assert len(conditions) == 1 + (len(result.plan.exits) + 1) * len(BUCKETS) + len(result.plan.exits)
    for condition in conditions:
        graph, test = home[condition]
        assert test.op_type in ("LessOrEqual", "Greater") and test.input[1] in constants
        count_graph, count = home[test.input[0]]
        assert count.op_type == "Shape" and count_graph == graph


def test_every_batch_size_matches_nested_and_beyond_the_largest_bucket():
    model, exits = deep_mlp(6), exits_at(5)
    x = np.random.default_rng(2).normal(size=(300, 8)).astype(np.float32)
    expected = calibrate_routes(model, exits, x, len(exits))
    bucketed = insert_exits(model, exits, "logits", "bucketed", (1, 8, 16, 32))
    onnx.checker.check_model(bucketed, full_check=True)
    session, nested = _session(bucketed), _session(insert_exits(model, exits, "logits", "nested"))
    for size in (0, 1, 2, 7, 8, 9, 31, 32, 33, 100, 300):
        logits, routes = session.run(None, {"x": x[:size]})
        nested_logits, _ = nested.run(None, {"x": x[:size]})
        np.testing.assert_array_equal(routes, expected[:size])
        np.testing.assert_allclose(logits, nested_logits, atol=1e-5)
        assert logits.shape == (size, 3)
    assert (expected == -1).any() and (expected >= 0).any()


def test_bucketed_nesting_is_bounded_and_bad_buckets_are_refused():
    model = deep_mlp(MAX_NESTED_GRAPHS)
    exits = exits_at(MAX_NESTED_GRAPHS - 4)
    with pytest.raises(ValueError, match="levels deep"):
        insert_exits(model, exits, "logits", "bucketed", (1, 2, 4, 8, 16))
    fits = insert_exits(model, exits[:MAX_NESTED_GRAPHS - 6], "logits", "bucketed", (1, 2, 4, 8, 16))
    assert subgraph_nesting(fits.graph) <= MAX_NESTED_GRAPHS
    for buckets, message in (((), "empty"), ((0, 8), "positive"), ((8, 1), "increasing"),
                             ((1, 8, 8), "more than once")):
        with pytest.raises(ValueError, match=message):
            insert_exits(model, exits[:2], "logits", "bucketed", buckets)



def test_no_op_runs_on_0_rows_so_a_reshape_that_cannot_is_safe():
    """A Reshape to [0, -1] fails on 0 rows (onnxruntime infers -1 beside a 0 dim); the bucketed graph
    never runs a stage on 0 rows, whether the batch is empty or every row has left."""
    model, exits = deep_mlp(4), exits_at(3)
    head = model.graph.node[-1]
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"))
    model.graph.node.insert(len(model.graph.node) - 1,
                            helper.make_node("Reshape", [head.input[0], "flat_shape"], ["flattened"], name="flatten"))
    head.input[0] = "flattened"
    with pytest.raises(Exception, match="flatten"):
        _session(model).run(None, {"x": np.zeros((0, 8), np.float32)})
    x = np.random.default_rng(4).normal(size=(40, 8)).astype(np.float32)
    everyone_leaves = [replace(e, thresholds=np.full_like(e.thresholds, -1e30)) for e in exits]
    for plan, rows, expected in ((exits, x[:0], []), (everyone_leaves, x, [0] * len(x))):
        logits, routes = _session(insert_exits(model, plan, "logits", "bucketed", (1, 8, 64))).run(None, {"x": rows})
        assert routes.tolist() == expected and logits.shape == (len(rows), 3)
