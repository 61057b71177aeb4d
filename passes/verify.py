"""Verify pass: check a compiled graph against the original on held-out rows.

* ``onnx.checker`` (full check) and shape inference pass;
* rows that run the full network (``moco_exit == -1``) match the original
  outputs to ``tolerance`` (max abs diff);
* exits taken agree with the plan's simulation, and exited rows' argmax is
  the exit rule's class;
* batch-1 runs agree with batched runs.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from moco_compile.errors import MocoError

EXIT_OUTPUT = "moco_exit"


class VerificationError(MocoError):
    """The compiled graph does not behave as the plan says."""


@dataclass
class Verification:
    rows: int
    full_rows: int
    max_abs_diff_full_rows: float
    exit_agreement: float
    exited_argmax_matches_rule: bool
    batch1_rows: int
    batch1_max_abs_diff: float

    def to_dict(self) -> dict:
        return asdict(self)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray], names: list[str],
         batch_size: int) -> list[np.ndarray]:
    rows = len(next(iter(inputs.values())))
    parts = [session.run(names, {k: v[s:s + batch_size] for k, v in inputs.items()})
             for s in range(0, rows, batch_size)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]


def verify_compiled(compiled: onnx.ModelProto, original: onnx.ModelProto, output: str,
                    inputs: Mapping[str, np.ndarray], expected_exit: np.ndarray,
                    expected_class: np.ndarray, tolerance: float = 1e-4,
                    min_exit_agreement: float = 0.995, batch1_rows: int = 16,
                    batch_size: int = 64) -> Verification:
    """Run the checks; raise :class:`VerificationError` naming the first that fails."""
    try:
        onnx.checker.check_model(compiled, full_check=True)
    except Exception as error:
        raise VerificationError(f"the compiled graph fails onnx.checker: {error}") from error
    original_out, = _run(_session(original), inputs, [output], batch_size)
    compiled_session = _session(compiled)
    compiled_out, exits = _run(compiled_session, inputs, [output, EXIT_OUTPUT], batch_size)
    full = exits == -1
    diff = float(np.abs(compiled_out[full] - original_out[full]).max()) if full.any() else 0.0
    if diff > tolerance:
        raise VerificationError(f"rows that run the full network differ from the original by "
                                f"{diff:.2e} (> {tolerance:g})")
    agreement = float((exits == expected_exit).mean()) if len(exits) else 1.0
    if agreement < min_exit_agreement:
        raise VerificationError(f"only {agreement:.1%} of rows took the exit the plan predicts")
    same = (exits == expected_exit) & (exits >= 0)
    argmax_ok = bool((compiled_out[same].argmax(axis=1) == expected_class[same]).all())
    if not argmax_ok:
        raise VerificationError("some exited rows' argmax differs from the exit rule's class")
    count = min(batch1_rows, len(exits))
    single_out, single_exits = _run(compiled_session, {k: v[:count] for k, v in inputs.items()},
                                    [output, EXIT_OUTPUT], 1)
    batch1_diff = float(np.abs(single_out - compiled_out[:count]).max()) if count else 0.0
    if batch1_diff > tolerance or not (single_exits == exits[:count]).all():
        raise VerificationError(f"batch-1 runs disagree with batched runs (max abs diff {batch1_diff:.2e})")
    return Verification(len(exits), int(full.sum()), diff, agreement, argmax_ok, count, batch1_diff)
