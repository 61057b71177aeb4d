"""ExitSession: provider choice and its log line, I/O binding, thread safety, exit statistics."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from moco_compile.errors import MocoError
from moco_compile.runtime.session import CPU, CUDA, ExitSession, ProviderError

CUDA_PRESENT = CUDA in ort.get_available_providers()


@pytest.fixture(scope="module")
def fresh_images():
    """Calibration images the compile fixture never saw."""
    from tests.conftest import CALIBRATION_NPZ, COMPILE_ROWS

    with np.load(CALIBRATION_NPZ) as data:
        return data["images"][COMPILE_ROWS:COMPILE_ROWS + 512]


def test_statistics_follow_the_plans_costs(compiled, fresh_images):
    result, out = compiled
    session = ExitSession(out / "model.onnx", providers=["cpu"])
    exits = np.concatenate([session.run({"images": fresh_images[i:i + 100]})["moco_exit"]
                            for i in range(0, len(fresh_images), 100)])
    stats = session.statistics
    assert stats.rows == len(fresh_images)
    assert stats.exit_counts == {int(k): int(n) for k, n in zip(*np.unique(exits, return_counts=True))}
    expected = 1 - result.plan.row_flops(exits).mean() / result.plan.total_flops
    assert stats.compute_reduction == pytest.approx(expected, rel=1e-9)
    assert stats.mean_flops < result.plan.total_flops
    assert sum(stats.exit_rates.values()) == pytest.approx(1.0)


def test_a_model_without_exits_has_no_cost_statistics(reference_onnx, fresh_images):
    session = ExitSession(reference_onnx, providers=["cpu"])
    session.run({"images": fresh_images[:8]})
    assert session.statistics.rows == 0 and session.statistics.compute_reduction is None


def test_io_binding_gives_the_same_outputs(compiled, fresh_images):
    _, out = compiled
    plain = ExitSession(out / "model.onnx", providers=["cpu"], io_binding=False)
    bound = ExitSession(out / "model.onnx", providers=["cpu"], io_binding=True)
    for rows in (fresh_images[:1], fresh_images[:200]):
        expected, got = plain.run({"images": rows}), bound.run({"images": rows})
        assert expected.keys() == got.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
    assert bound.exit_counts == plain.exit_counts


def test_concurrent_runs_count_every_row_once(compiled, fresh_images):
    _, out = compiled
    session = ExitSession(out / "model.onnx", providers=["cpu"], io_binding=True)
    batches = [fresh_images[i:i + 32] for i in range(0, len(fresh_images), 32)]
    reference = ExitSession(out / "model.onnx", providers=["cpu"])
    alone = [reference.run({"images": b})["moco_exit"] for b in batches]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda b: session.run({"images": b})["moco_exit"], batches))
    for expected, got in zip(alone, together):
        np.testing.assert_array_equal(got, expected)
    counts = np.unique(np.concatenate(alone), return_counts=True)
    assert session.exit_counts == {int(k): int(n) for k, n in zip(*counts)}


def test_one_log_line_names_the_provider_and_why(compiled, caplog):
    _, out = compiled
    with caplog.at_level(logging.INFO, logger="moco"):
        session = ExitSession(out / "model.onnx", providers=["cuda", "cpu"])
    lines = [r for r in caplog.records if r.name == "moco"]
    assert len(lines) == 1 and session.provider in lines[0].getMessage()
    if not CUDA_PRESENT:  # asked for CUDA, fell back: say so, and how to get it
        assert session.provider == CPU and lines[0].levelno == logging.WARNING
        assert CUDA in lines[0].getMessage() and "moco-compile[gpu]" in lines[0].getMessage()


def test_required_gpu_is_never_silently_replaced(compiled):
    _, out = compiled
    if CUDA_PRESENT:
        assert ExitSession(out / "model.onnx", providers=["cuda"], require_gpu=True).provider != CPU
    else:
        with pytest.raises(ProviderError, match="GPU was required"):
            ExitSession(out / "model.onnx", providers=["cuda"], require_gpu=True)


def test_bad_provider_and_feed_are_clear_errors(compiled, fresh_images):
    _, out = compiled
    with pytest.raises(ProviderError, match="unknown execution provider 'tpu'"):
        ExitSession(out / "model.onnx", providers=["tpu"])
    session = ExitSession(out / "model.onnx", providers=["cpu"])
    with pytest.raises(MocoError, match="lacks the model input"):
        session.run({"pixels": fresh_images[:2]})
    with pytest.raises(MocoError, match="could not run the batch"):
        session.run({"images": fresh_images[:2, :, :14]})


def test_latency_comparison_times_as_many_batches_as_fit_its_time(reference_onnx, fresh_images):
    """Given a short time, the comparison times a slice of the rows (five rounds of it), not every
    row: a compile's latency figure costs about its budget whatever the calibration set's size."""
    from moco_compile.runtime.latency import time_sessions
    from moco_compile.runtime.session import make_session

    sessions = {name: make_session(str(reference_onnx), ["CPUExecutionProvider"]) for name in ("a", "b")}
    inputs = {"images": fresh_images}
    short = time_sessions(sessions, inputs, batch_size=1, seconds=0.05)
    assert 5 <= short.batches_timed < 5 * len(fresh_images)  # rounds x a slice of the 512 single-row batches
    longer = time_sessions(sessions, inputs, batch_size=1, seconds=0.5)
    assert longer.batches_timed > short.batches_timed
    assert set(short.seconds) == {"a", "b"} and all(value > 0 for value in short.seconds.values())
