"""Verify pass: check a compiled graph against the original on the rows given (``compile``: the
first calibration rows, of every split), with onnxruntime on CPU only (``Verification.scope``
says so in the report):

* ``onnx.checker`` (full check) and shape inference pass;
* rows that run the full network (``moco_exit == -1``) match the original
  outputs to ``tolerance`` (max abs diff);
* every row takes the exit the plan's simulation (:func:`~moco_compile.passes.planning.routing.route`)
  gives it, except rows within float rounding of a threshold (``near_threshold``,
  counted against the budget at certification), and exited rows' argmax is the
  exit rule's class;
* batch-1 runs agree with batched runs.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from moco_compile.constants import EXIT_OUTPUT
from moco_compile.errors import MocoError
from moco_compile.passes.graph.index import all_nodes
from moco_compile.passes.planning.routing import Routing



class VerificationError(MocoError):
    """The compiled graph does not behave as the plan says."""


@dataclass
class Verification:
    rows: int
    full_rows: int
    max_abs_diff_full_rows: float
    exit_agreement: float
    near_threshold_rows: int  # rows allowed to route differently (within rounding of a threshold)
    rerouted_rows: int  # rows that did route differently (all of them near a threshold)
    exited_argmax_matches_rule: bool
    batch1_rows: int
    batch1_max_abs_diff: float
    empty_batch_checked: bool  # False: the original model fails on 0 rows too
    scope: str = ""  # what was checked, where, and what was not (VERIFICATION_SCOPE)

    def to_dict(self) -> dict:
        return asdict(self)


VERIFICATION_SCOPE = ("the compiled graph was checked against the certified simulation on {rows}, with onnxruntime "
                      "{version} on CPU (CPUExecutionProvider) in batches of {batch_size} (the first {batch1_rows} "
                      "also one at a time): every row took the exit the simulation gives it, except rows within the "
                      "rounding tolerance of a threshold (counted against the budget at certification). Other rows, "
                      "other execution providers and other settings were not checked: CUDA with TF32 on, for one, "
                      "rounds differently and can route rows differently (moco's ExitSession turns TF32 off)")


BATCH_DEPENDENCE = ("the other rows in its batch (dynamic int8 quantization sets activation ranges per batch), exits "
                    "change which rows share a batch and no plan can hold: compile the float model, or quantize "
                    "with static int8 (fixed ranges) first")
# Measured on the 6-block MiniLM quantized to static int8 (QDQ): the model alone gives the same rows the
# same outputs in any batch, yet its compiled graph's full-network rows differed by 0.26.
QDQ_REWRITE = ("its quantized (QuantizeLinear/DequantizeLinear) operators, which onnxruntime fuses into integer "
               "kernels in the original graph but may run differently inside the exits' If branches: compile the "
               "float model")

def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise VerificationError(f"onnxruntime cannot load the graph to verify: {error}") from error


def _run(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray], names: list[str],
         batch_size: int) -> list[np.ndarray]:
    rows = len(next(iter(inputs.values())))
    try:
        parts = [session.run(names, {k: v[s:s + batch_size] for k, v in inputs.items()})
                 for s in range(0, rows, batch_size)]
    except Exception as error:  # onnxruntime raises its own exception types
        raise VerificationError(f"onnxruntime failed while running the graph to verify: {error}") from error
    return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]


def _close(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> bool:
    """Equal within ``tolerance`` plus 4 units of the dtype's precision at the outputs' scale (float16
    graphs round the cut tensor to float16 at the If boundary, where one graph keeps float32 between
    operations)."""
    expected = expected.astype(np.float64)
    scale = np.abs(expected).max() if expected.size else 0.0
    slack = tolerance + 4 * np.finfo(actual.dtype).eps * scale
    return bool((np.abs(actual.astype(np.float64) - expected) <= slack).all())


def _has_static_quantization(model: onnx.ModelProto) -> bool:
    ops = {node.op_type for node in all_nodes(model.graph)}
    return "DequantizeLinear" in ops and "DynamicQuantizeLinear" not in ops


def _check_empty_batch(session: ort.InferenceSession, original: ort.InferenceSession,
                       inputs: Mapping[str, np.ndarray], output: str, trailing: tuple[int, ...]) -> bool:
    """A batch of 0 rows gives 0-row outputs of the right trailing shape; False (not checked) when
    the original model itself fails on 0 rows (e.g. a Reshape to ``[0, C, -1]``).

    These runs log nothing: a failure is an answer here (or becomes the error raised), and
    onnxruntime would otherwise print its own ``[E:onnxruntime:...] Non-zero status code`` line
    to stderr in the middle of a compile that succeeds."""
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # fatal only: this run's kernel errors come back as the exception alone
    try:
        original.run([output], {k: v[:0] for k, v in inputs.items()}, quiet)
    except Exception:  # onnxruntime raises its own exception types
        return False
    try:
        out, exits = session.run([output, EXIT_OUTPUT], {k: v[:0] for k, v in inputs.items()}, quiet)
    except Exception as error:  # onnxruntime raises its own exception types
        raise VerificationError(f"the compiled graph fails on a batch of 0 rows: {error}") from error
    if out.shape != (0, *trailing) or exits.shape != (0,):
        raise VerificationError(f"a batch of 0 rows gives outputs of shape {out.shape} and {exits.shape}, "
                                f"expected {(0, *trailing)} and (0,)")
    return True


def _original_outputs(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray], output: str,
                      batch_size: int, recorded: np.ndarray | None, tolerance: float) -> np.ndarray:
    """The original's ``output`` on ``inputs``: ``recorded`` when given and its first batch is what
    ``session`` gives (else an error: the recorded outputs are not this model's), else run."""
    if recorded is None:
        return _run(session, inputs, [output], batch_size)[0]
    first, = _run(session, {k: v[:batch_size] for k, v in inputs.items()}, [output], batch_size)
    if first.shape != recorded[:batch_size].shape or not _close(recorded[:batch_size], first, tolerance):
        raise VerificationError("the original model's outputs recorded while calibrating differ from what it gives "
                                f"now on the same rows: if its output for a row depends on {BATCH_DEPENDENCE}")
    return recorded


def verify_compiled(compiled: onnx.ModelProto, original: onnx.ModelProto, output: str,
                    inputs: Mapping[str, np.ndarray], expected: Routing, tolerance: float = 1e-4,
                    batch1_rows: int = 16, batch_size: int = 64, rows_described: str | None = None,
                    original_outputs: np.ndarray | None = None) -> Verification:
    """Run the checks; raise :class:`VerificationError` naming the first that fails.

    ``expected`` is the plan's routing of ``inputs``' rows, computed with the rounding
    tolerance the plan was certified with.  ``rows_described`` says in the result's ``scope``
    which rows ``inputs`` are (default: "N rows").  ``original_outputs``: the original model's
    ``output`` on those rows when it ran on them already (the calibration run); the original
    then runs on the first batch only, to check those outputs are its own.
    """
    try:
        onnx.checker.check_model(compiled, full_check=True)
    except Exception as error:
        raise VerificationError(f"the compiled graph fails onnx.checker: {error}") from error
    original_session = _session(original)
    original_out = _original_outputs(original_session, inputs, output, batch_size, original_outputs, tolerance)
    compiled_session = _session(compiled)
    compiled_out, exits = _run(compiled_session, inputs, [output, EXIT_OUTPUT], batch_size)
    full = exits == -1
    diff = float(np.abs(compiled_out[full] - original_out[full]).max()) if full.any() else 0.0
    if not _close(compiled_out[full], original_out[full], tolerance):
        cause = (f"the likely cause is {QDQ_REWRITE}" if _has_static_quantization(original)
                 else f"if the model's output for a row depends on {BATCH_DEPENDENCE}")
        raise VerificationError(f"rows that run the full network differ from the original by "
                                f"{diff:.2e} (> {tolerance:g} plus 4 units of the output's precision); {cause}")
    rerouted = exits != expected.exit_index
    unexplained = rerouted & ~expected.near_threshold
    if unexplained.any():
        raise VerificationError(f"{int(unexplained.sum())} of {len(exits)} rows took another exit than the "
                                "certified plan gives them, and not because they sit within rounding of a "
                                "threshold; the compiled graph does not implement the plan")
    same = ~rerouted & (exits >= 0) & ~expected.near_threshold
    argmax_ok = bool((compiled_out[same].argmax(axis=1) == expected.exit_class[same]).all())
    if not argmax_ok:
        raise VerificationError("some exited rows' argmax differs from the exit rule's class")
    count = min(batch1_rows, len(exits))
    single_out, single_exits = _run(compiled_session, {k: v[:count] for k, v in inputs.items()},
                                    [output, EXIT_OUTPUT], 1)
    steady = ~expected.near_threshold[:count]  # rows near a threshold may flip between batch sizes too
    batch1_diff = float(np.abs(single_out[steady] - compiled_out[:count][steady]).max()) if steady.any() else 0.0
    if not _close(single_out[steady], compiled_out[:count][steady], tolerance) \
            or not (single_exits[steady] == exits[:count][steady]).all():
        raise VerificationError(
            f"batch-1 runs disagree with batched runs (max abs diff {batch1_diff:.2e}): the model's output for a "
            f"row depends on {BATCH_DEPENDENCE}")
    empty_batch = _check_empty_batch(compiled_session, original_session, inputs, output, compiled_out.shape[1:])
    agreement = float((~rerouted).mean()) if len(exits) else 1.0
    scope = VERIFICATION_SCOPE.format(rows=rows_described or f"{len(exits)} rows", version=ort.__version__,
                                      batch_size=batch_size, batch1_rows=count)
    return Verification(len(exits), int(full.sum()), diff, agreement, int(expected.near_threshold.sum()),
                        int(rerouted.sum()), argmax_ok, count, batch1_diff, empty_batch, scope)
