"""A staged export of the reference CNN served by a real Triton server (nvidia-pytriton's
``tritonserver``, python backend: stage models are model.py running onnxruntime): concurrent requests
of different sizes over gRPC and HTTP get the single graph's rows back, continuing rows of different
requests are batched together, and rows per exit and queue time per stage reach the metrics endpoint."""
from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from moco_compile.constants import EXIT_OUTPUT
from moco_compile.runtime.triton.repository import TritonSettings
from moco_compile.runtime.triton.server import TritonServer
from moco_compile.stage_models import export_triton_staged
from tests.triton_helpers import infer

pytestmark = pytest.mark.slow  # the fast tier (`pytest -m "not slow"`) leaves this file out

MODEL = "cnn"
SIZES = [1, 3, 7, 16, 5, 2, 11, 9, 16, 1, 4, 13, 8, 3, 6, 12]  # rows per request: 117 in all


@pytest.fixture(scope="module")
def server(compiled, server_env, tmp_path_factory):
    repository = tmp_path_factory.mktemp("triton-staged") / "repo"
    settings = TritonSettings(max_batch_size=16, backend="python", preferred_batch_sizes=(8, 16),
                              max_queue_delay_us=20_000)  # a long wait: requests sent together meet
    export_triton_staged(compiled[1], repository, MODEL, settings)
    with TritonServer(repository, server_env) as running:
        yield running


def _stage_counts(server: TritonServer) -> dict[str, tuple[int, int]]:
    """Per stage model: (requests answered, executions)."""
    client = httpclient.InferenceServerClient(server.address("http"))
    try:
        stats = client.get_inference_statistics()["model_stats"]
    finally:
        client.close()
    return {s["name"]: (s["inference_stats"]["success"]["count"], s["execution_count"])
            for s in stats if s["name"].startswith(f"{MODEL}_stage")}


def _metrics(server: TritonServer) -> list[str]:
    with urllib.request.urlopen(f"http://{server.address('metrics')}/metrics", timeout=10) as response:
        return response.read().decode().splitlines()


def test_concurrent_requests_over_grpc_and_http_get_the_single_graphs_rows(server, compiled_outputs, calibration):
    images = calibration["images"][-sum(SIZES):]
    chunks = np.split(images, np.cumsum(SIZES)[:-1])
    protocols = [(grpcclient, "grpc") if i % 2 else (httpclient, "http") for i in range(len(chunks))]
    before = _stage_counts(server)
    with ThreadPoolExecutor(max_workers=8) as pool:
        served = list(pool.map(lambda job: infer(job[0][0], server.address(job[0][1]), MODEL, job[1]),
                               zip(protocols, chunks)))
    for chunk, result in zip(chunks, served):
        expected = compiled_outputs(chunk)
        assert result[EXIT_OUTPUT].shape == (len(chunk), 1)
        np.testing.assert_array_equal(result[EXIT_OUTPUT][:, 0], expected[EXIT_OUTPUT])
        np.testing.assert_allclose(result["logits"], expected["logits"], rtol=1e-5, atol=1e-5)
    assert len(set(np.concatenate([r[EXIT_OUTPUT][:, 0] for r in served]).tolist())) >= 4
    after = _stage_counts(server)
    merged = {name: (after[name][0] - before.get(name, (0, 0))[0], after[name][1] - before.get(name, (0, 0))[1])
              for name in after}
    # rows of different client requests shared stage runs: the entry stacks the requests Triton batched
    # for it into one stage call, and the stage models' batchers merge calls
    stage0_requests, stage0_runs = merged[f"{MODEL}_stage0"]
    assert 1 <= stage0_requests <= len(chunks)
    assert stage0_runs < len(chunks) or any(runs < requests for requests, runs in merged.values()), merged


def test_rows_per_exit_and_queue_time_per_stage_are_on_the_metrics_endpoint(server, compiled_outputs, calibration):
    def exit_rows() -> dict[str, float]:
        rows = {}
        for line in _metrics(server):
            if line.startswith("moco_exit_rows_total{") and f'model="{MODEL}"' in line:
                labels, value = line.rsplit(" ", 1)
                rows[labels.split('exit="')[1].split('"')[0]] = float(value)
        return rows

    images = calibration["images"][:16]
    before = exit_rows()
    infer(grpcclient, server.address("grpc"), MODEL, images)
    after = exit_rows()
    taken, rows = np.unique(compiled_outputs(images)[EXIT_OUTPUT], return_counts=True)
    assert {e: after[e] - before.get(e, 0) for e in after if after[e] != before.get(e, 0)} == \
        dict(zip(map(str, taken.tolist()), rows.tolist()))
    stages = {path.name for path in server.repository.iterdir() if path.name.startswith(f"{MODEL}_stage")}
    queued = {line.split('model="')[1].split('"')[0] for line in _metrics(server)
              if line.startswith("nv_inference_queue_duration_us{")}
    assert len(stages) >= 2 and stages <= queued
