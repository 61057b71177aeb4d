"""Faults under load (issue 27 item 5) on a real Triton server: a stage model that fails on one request
fails that request only and the server serves the rest; a request with a wrong dtype or shape gets a
Triton error naming the input.

Run on the single-graph export and on the staged export (the entry model NAME plus NAME_stage<k>:
``moco_compile.stage_models.export_triton_staged``, the CLI's ``--staged``).  The fault is
injected below model.py, in the onnxruntime session of the model that runs stage 0 (the single
graph: the whole graph): its ``run`` raises when a row of the batch carries :data:`POISON`, so that
model.py's own error handling, and the entry model's, decide what the other requests get.  Dynamic
batching is given a long queue delay (when the settings have one), so the poisoned request meets
others in one batch.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from moco_compile.constants import EXIT_OUTPUT
from moco_compile.runtime.triton.repository import TritonSettings, export_triton
from moco_compile.stage_models import export_triton_staged
from moco_compile.runtime.triton.server import TritonServer

pytestmark = pytest.mark.slow

POISON = 12345.0  # a pixel value no image has: the faulty session raises on a batch holding it
VARIANTS = ["graph", "staged"]
REQUESTS = 24  # concurrent one-row requests per round, one of them poisoned
FAULT = '''

# --- injected by tests/test_serving_load.py: the session raises on a batch holding a poisoned row
class _PoisonedSession:
    def __init__(self, session):
        self._session = session

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run(self, names, feeds, *args, **kwargs):
        for value in feeds.values():
            if value.dtype.kind == "f" and bool((value == {poison}).any()):
                raise RuntimeError("injected fault: a poisoned row")
        return self._session.run(names, feeds, *args, **kwargs)


_MocoModel = TritonPythonModel


class TritonPythonModel(_MocoModel):
    def initialize(self, args):
        super().initialize(args)
        self.session = _PoisonedSession(self.session)
'''


def _settings() -> TritonSettings:
    """Python backend, max batch 32, a 20 ms queue delay (requests meet in a batch)."""
    return TritonSettings(max_batch_size=32, backend="python", max_queue_delay_us=20_000)


def _export(variant: str, build: Path, repository: Path) -> str:
    """Export ``variant`` as the model "cnn" of ``repository``; the name of the model that runs stage 0."""
    if variant == "graph":
        export_triton(build, repository, "cnn", _settings())
        return "cnn"
    targets = export_triton_staged(build, repository, "cnn", _settings())
    return targets[1].name  # stage 0


def _inject_fault(model_dir: Path) -> None:
    script = model_dir / "1" / "model.py"
    text = script.read_text()
    assert "class TritonPythonModel" in text and "self.session" in text, "model.py no longer holds self.session"
    script.write_text(text + FAULT.format(poison=POISON))


@pytest.fixture(scope="module", params=VARIANTS)
def served(request, compiled, server_env, tmp_path_factory):
    """(variant, server) serving the reference CNN's build, the session of stage 0 made faulty."""
    repository = tmp_path_factory.mktemp(f"faults-{request.param}") / "repo"
    _inject_fault(repository / _export(request.param, compiled[1], repository))
    with TritonServer(repository, server_env) as server:
        yield request.param, server


@pytest.fixture(scope="module")
def images(calibration) -> np.ndarray:
    return calibration["images"][-REQUESTS:]


def _infer(server: TritonServer, inputs: list[grpcclient.InferInput]):
    client = grpcclient.InferenceServerClient(server.address("grpc"))
    try:
        return client.infer("cnn", inputs, client_timeout=60)
    finally:
        client.close()


def _image_request(image: np.ndarray) -> list[grpcclient.InferInput]:
    request = grpcclient.InferInput("images", list(image.shape), "FP32")
    request.set_data_from_numpy(image)
    return [request]


def _round(server: TritonServer, images: np.ndarray, poisoned: int) -> list:
    """Every image as a request of its own, all at once, image ``poisoned`` poisoned: the results
    (an InferenceServerException for a failed request)."""
    rows = images.copy()
    rows[poisoned, 0, 0, 0] = POISON

    def one(i: int):
        try:
            return _infer(server, _image_request(rows[i:i + 1]))
        except InferenceServerException as error:
            return error

    with ThreadPoolExecutor(max_workers=len(rows)) as pool:
        return list(pool.map(one, range(len(rows))))


def test_a_request_the_model_fails_on_fails_alone(served, images, compiled_outputs, request):
    variant, server = served
    expected = compiled_outputs(images)
    for poisoned in (0, REQUESTS // 2, REQUESTS - 1):
        results = _round(server, images, poisoned)
        failed = [i for i, result in enumerate(results) if isinstance(result, InferenceServerException)]
        assert failed == [poisoned], f"{variant}: requests {failed} failed; only {poisoned} was poisoned " \
                                     f"({results[failed[0]] if failed else ''})"
        assert "injected fault" in str(results[poisoned])
        for i, result in enumerate(results):
            if i != poisoned:
                assert result.as_numpy(EXIT_OUTPUT)[0, 0] == expected[EXIT_OUTPUT][i]
                np.testing.assert_allclose(result.as_numpy("logits")[0], expected["logits"][i], rtol=1e-5, atol=1e-5)
    result = _infer(server, _image_request(images[:4]))  # and it goes on serving
    np.testing.assert_array_equal(result.as_numpy(EXIT_OUTPUT)[:, 0], expected[EXIT_OUTPUT][:4])


@pytest.mark.parametrize("dtype, shape, said", [
    ("FP64", [1, 1, 28, 28], r"(?i)data-?type"),
    ("INT32", [1, 1, 28, 28], r"(?i)data-?type"),
    ("FP32", [1, 1, 28, 27], r"(?i)shape"),
    ("FP32", [1, 28, 28], r"(?i)shape"),
])
def test_a_wrong_dtype_or_shape_gets_an_error_naming_the_input(served, images, dtype, shape, said):
    variant, server = served
    request = grpcclient.InferInput("images", shape, dtype)
    request.set_data_from_numpy(np.zeros(shape, {"FP64": np.float64, "INT32": np.int32, "FP32": np.float32}[dtype]))
    with pytest.raises(InferenceServerException, match=said) as raised:
        _infer(server, [request])
    assert "images" in str(raised.value), f"{variant}: {raised.value}"
    assert _infer(server, _image_request(images[:1])).as_numpy(EXIT_OUTPUT).shape == (1, 1)  # still serving
