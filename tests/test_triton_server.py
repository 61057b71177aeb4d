"""A python-backend export of the reference CNN served by a real Triton server (the ``tritonserver``
nvidia-pytriton ships), queried over HTTP and gRPC, against onnxruntime on the build's model.

The server's environment is conftest's ``server_env`` (nvidia-pytriton, numpy < 2, onnxruntime, built
once in the git-ignored ``.triton-env/`` of the checkout and reused while it is valid).
"""
from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from typer.testing import CliRunner

from moco_compile.cli import app
from moco_compile.constants import EXIT_OUTPUT
from moco_compile.errors import MocoError
from moco_compile.runtime.triton.repository import TritonSettings, export_triton
from moco_compile.runtime.triton.server import TritonServer
from tests.triton_helpers import infer

pytestmark = pytest.mark.slow  # the fast tier (`pytest -m "not slow"`) leaves this file out

MODEL = "cnn"


@pytest.fixture(scope="module")
def repository(compiled, tmp_path_factory) -> Path:
    repository = tmp_path_factory.mktemp("triton") / "repo"
    export_triton(compiled[1], repository, MODEL, TritonSettings(max_batch_size=16, instances=2, backend="python"))
    return repository


@pytest.fixture(scope="module")
def server(repository, server_env):
    with TritonServer(repository, server_env) as running:
        yield running


@pytest.fixture(scope="module")
def images(calibration) -> np.ndarray:
    return calibration["images"][-40:]  # rows of every exit: checked in test_batch_over_http_and_grpc


def _http(server: TritonServer, images: np.ndarray) -> dict[str, np.ndarray]:
    return _query_http(server.address("http"), images)


def _query_http(address: str, images: np.ndarray) -> dict[str, np.ndarray]:
    return infer(httpclient, address, MODEL, images)


def _grpc(server: TritonServer, images: np.ndarray) -> dict[str, np.ndarray]:
    return infer(grpcclient, server.address("grpc"), MODEL, images)


def _assert_served(served: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Triton returns the exit index as [rows, 1] (dims [1], reshape []); the values are onnxruntime's."""
    assert served[EXIT_OUTPUT].shape == (len(expected[EXIT_OUTPUT]), 1)
    np.testing.assert_array_equal(served[EXIT_OUTPUT][:, 0], expected[EXIT_OUTPUT])
    np.testing.assert_allclose(served["logits"], expected["logits"], rtol=1e-5, atol=1e-5)


def _exit_counts(server) -> dict[str, float]:
    """The model's per-exit row counters on the metrics endpoint."""
    text = urllib.request.urlopen(f"http://{server.address('metrics')}/metrics", timeout=10).read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("moco_exit_rows_total{") and f'model="{MODEL}"' in line:
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('exit="')[1].split('"')[0]] = float(value)
    return counts


@pytest.mark.parametrize("query", [_http, _grpc], ids=["http", "grpc"])
def test_one_row(server, compiled_outputs, images, query):
    _assert_served(query(server, images[:1]), compiled_outputs(images[:1]))


@pytest.mark.parametrize("query", [_http, _grpc], ids=["http", "grpc"])
def test_batch(server, compiled_outputs, images, query):
    expected = compiled_outputs(images[:16])
    assert len(set(expected[EXIT_OUTPUT].tolist())) >= 2  # early exits and the full network both served
    _assert_served(query(server, images[:16]), expected)


def test_concurrent_requests_each_get_their_own_rows(server, compiled_outputs, images):
    """Dynamic batching hands model.py several requests at once: each must get its own rows back."""
    chunks = np.array_split(images, 10)
    with ThreadPoolExecutor(max_workers=10) as pool:
        served = list(pool.map(lambda chunk: _http(server, chunk), chunks))
    for chunk, result in zip(chunks, served):
        _assert_served(result, compiled_outputs(chunk))


def test_rows_per_exit_are_counted_on_the_metrics_endpoint(server, compiled_outputs, images):
    before = _exit_counts(server)
    _grpc(server, images[-16:])
    after = _exit_counts(server)
    taken, rows = np.unique(compiled_outputs(images[-16:])[EXIT_OUTPUT], return_counts=True)
    expected = dict(zip(map(str, taken.tolist()), rows.tolist()))
    assert {exit: after[exit] - before.get(exit, 0) for exit in after if after[exit] != before.get(exit, 0)} == expected


def test_stop_ends_the_server_its_stubs_and_their_shared_memory(repository, server_env):
    regions = set(Path("/dev/shm").glob(f"moco-triton-{os.getpid()}-*"))  # the module's server's
    server = TritonServer(repository, server_env).start()
    group = server.process.pid
    client = http.client.HTTPConnection(server.address("http"))  # an idle keep-alive client: the
    client.request("GET", "/v2/health/live")                    # server exits by its exit timeout
    assert client.getresponse().read() == b""
    server.stop()
    client.close()
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)  # nothing of the group is left
    assert set(Path("/dev/shm").glob(f"moco-triton-{os.getpid()}-*")) == regions
    assert server.process is None and "Exit timeout expired" in server.log()


def test_port_in_use_is_refused(repository, server_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MocoError, match=f"cannot use port {port} on 127.0.0.1 for Triton's grpc service"):
            TritonServer(repository, server_env, grpc_port=port).start()


def test_serve_triton_serves_until_interrupted(repository, server_env, compiled_outputs, images):
    command = [sys.executable, "-m", "moco_compile.cli", "serve-triton", str(repository), "--env", str(server_env),
               "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--timeout", "60"]
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = cli.stdout.readline()
        if not line:  # the CLI failed and exited: its error is on stderr
            pytest.fail(f"moco serve-triton exited: {cli.communicate(timeout=30)[1]}")
        addresses = re.fullmatch(r"serving .*: HTTP (\S+), gRPC \S+, metrics \S+; Ctrl-C stops\n", line)
        assert addresses, line
        _assert_served(_query_http(addresses[1], images[:3]), compiled_outputs(images[:3]))
    finally:
        cli.send_signal(signal.SIGTERM)  # SIGINT is ignored by processes a non-interactive shell backgrounds
        status = cli.wait(timeout=30)
    assert status == 0, cli.stderr.read()
    host, port = addresses[1].rsplit(":", 1)
    with pytest.raises(OSError):  # the server is gone with the CLI
        socket.create_connection((host, int(port)), timeout=2)


def test_serve_triton_reports_a_port_in_use(repository, server_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = CliRunner().invoke(app, ["serve-triton", str(repository), "--env", str(server_env),
                                       "--http-port", str(port)])
    assert run.exit_code == 2 and "Traceback" not in run.output
    assert f"cannot use port {port} on 127.0.0.1 for Triton's http service" in run.output


def test_model_that_fails_to_load_is_reported_with_the_log(compiled, server_env, tmp_path):
    export_triton(compiled[1], tmp_path / "repo", MODEL, TritonSettings(backend="python"))
    (tmp_path / "repo" / MODEL / "1" / "model.onnx").write_bytes(b"not a model")
    server = TritonServer(tmp_path / "repo", server_env)
    with pytest.raises(MocoError, match=r"(?s)tritonserver exited with status \d+ before it was ready.*"
                                        r"failed to load 'cnn'"):
        server.start()
    assert server.process is None


def test_environment_without_pytriton_is_refused(repository):
    with pytest.raises(MocoError, match="has no nvidia-pytriton.*pip install nvidia-pytriton==0.7.0 'numpy<2'"):
        TritonServer(repository, sys.prefix).start()


def test_environment_with_numpy_2_is_refused(repository, tmp_path):
    """With numpy 2, Triton 2.51's python backend hands model.py zeros: refuse before starting."""
    env = tmp_path / "env"
    venv.EnvBuilder().create(env)
    site = next(env.glob("lib/python*/site-packages"))
    (site / "pytriton").mkdir()
    (site / "pytriton" / "__init__.py").write_text("")
    (site / "numpy-2.1.0.dist-info").mkdir()
    (site / "numpy-2.1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 2.1.0\n")
    with pytest.raises(MocoError, match=r"has numpy 2.1.0; Triton's python backend needs numpy < 2.*'numpy<2'"):
        TritonServer(repository, env).start()
