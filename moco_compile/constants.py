"""Names every part of moco shares: the compiled graph's extra output and cost metadata."""
from __future__ import annotations

EXIT_OUTPUT = "moco_exit"  # int64 per row: the index of the exit the row took, -1 = full network
STAGE_FLOPS_KEY = "moco.stage_flops"  # metadata: JSON list, FLOPs of a row leaving at exit k (last: full network)
FLOPS_ORIGINAL_KEY = "moco.flops_original"  # metadata: the original model's FLOPs per row
ADDED_NODE_PREFIX = "moco/"  # names of the tensors and nodes the rewrite adds to a model
