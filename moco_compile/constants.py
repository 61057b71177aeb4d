"""Names every part of moco shares: the compiled graph's extra output and cost metadata, and the
columns of the calibration frame (``labels`` is also the key of the labels in calibration data)."""
from __future__ import annotations

EXIT_OUTPUT = "moco_exit"  # int64 per row: the index of the exit the row took, -1 = full network
STAGE_FLOPS_KEY = "moco.stage_flops"  # metadata: JSON list, FLOPs of a row leaving at exit k (last: full network)
FLOPS_ORIGINAL_KEY = "moco.flops_original"  # metadata: the original model's FLOPs per row
ADDED_NODE_PREFIX = "moco/"  # names of the tensors and nodes the rewrite adds to a model

PREDICTIONS = "predictions"  # frame column, int64 per row: the full model's class
PROBABILITIES = "probabilities"  # frame column, per row and class: the full model's output as probabilities
OUTPUTS = "outputs"  # frame column, per row: the full model's classifier output as the model gives it
LABELS = "labels"  # frame column and calibration-data key, int per row: the true class (optional)
SPLIT_COLUMN = "split"  # frame column of a build's kept rows: index into passes.planning.splits.SPLITS

# A target profile (``moco profile-target --out target.json``): what the runtime measures
# (runtime/profile_target.py writes these keys) and the planner reads
# (passes/planning/target.py, TargetProfile.from_dict).
TARGET_PROFILE_FORMAT = "moco-target-profile"  # the file's "format"
TARGET_PROFILE_VERSION = 1  # the file's "version"; a reader refuses others
TARGET_PROFILE_FIELDS = ("name", "provider", "exit_fixed_seconds", "flops_per_second", "copy_bytes_per_second",
                         "machine", "onnxruntime", "measured_on")  # besides format, version and generator


# Names in a bucketed graph (passes/graph/buckets.py) that the stage runner (runtime/staged.py) cuts it
# back by: the subgraph of each (stage, bucket) instance, its inputs (the rows it gathers) and its
# outputs (named by role: carry/<tensor>, keep, exited/<output>, out/<output>).  Bucket None: the
# instance that runs a stage on exactly its rows.
def instance_tag(stage: int, bucket: int | None) -> str:
    """The tag an instance's names carry: ``moco_s<stage>_b<bucket>``, ``moco_s<stage>_bN`` for the
    instance that runs a stage on exactly its rows (a count above the largest bucket, or none)."""
    return f"moco_s{stage}_b{'N' if bucket is None else bucket}"


def instance_graph_name(stage: int, bucket: int | None) -> str:
    """The name of the subgraph holding stage ``stage``'s instance for ``bucket``."""
    return f"moco_stage{stage}_bucket{'N' if bucket is None else bucket}"


ENTRY_ROWS = "moco/entry/rows"  # int64 [1]: the batch's rows, read by stage 0's instances


def exit_count(stage: int) -> str:
    """The int64 ``[1]`` count of rows continuing past exit ``stage``, read by stage ``stage + 1``'s instances."""
    return f"moco/exit{stage}/count"


def instance_positions(tag: str) -> str:
    """The rows an instance gathers (the tensors computing them are named under it, too)."""
    return f"moco/{tag}/positions"


def instance_input(tag: str, tensor: str) -> str:
    """The name of the rows of ``tensor`` an instance gathers into its bucket."""
    return f"moco/{tag}/in/{tensor}"


def instance_output(tag: str, role: str) -> str:
    """The name of an instance's output playing ``role``."""
    return f"moco/{tag}/{role}"
