"""Run Triton Inference Server from an nvidia-pytriton environment, on loopback.

The ``nvidia-pytriton`` 0.7.0 wheel ships ``tritonserver`` 2.51 with the python backend only
(``SITE`` is the environment's site-packages)::

    SITE/pytriton/tritonserver/bin/tritonserver
    SITE/pytriton/tritonserver/backends/python/              libtriton_python.so, triton_python_backend_utils.py
    SITE/pytriton/tritonserver/python_backend_stubs/X.Y/     triton_python_backend_stub, one per Python version
    SITE/nvidia_pytriton.libs/                               the shared libraries they load

The python backend runs the stub found in its own directory, so :class:`TritonServer` does what
pytriton does: it assembles a backend directory in a temporary workspace (the backend plus the
stub of the environment's Python), puts the environment's ``bin/`` first on ``PATH`` (the stub
runs that Python) and its libraries on ``LD_LIBRARY_PATH``.  The environment needs numpy < 2
(with numpy 2, inputs reach model.py as zeros) and onnxruntime (for moco's model.py)::

    python -m venv ENV && ENV/bin/pip install nvidia-pytriton==0.7.0 'numpy<2' onnxruntime

The server runs in its own process group; :meth:`TritonServer.stop` ends the whole group (the
stubs included).  It starts on a CPU-only machine (CUDA/NVML/DCGM warnings in its log are
harmless); a ``KIND_GPU`` instance fails to load there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from moco_compile.errors import MocoError

SETUP = "python -m venv ENV && ENV/bin/pip install nvidia-pytriton==0.7.0 'numpy<2' onnxruntime"
SERVICES = ("http", "grpc", "metrics")
SHARED_MEMORY = Path("/dev/shm")  # where the python backend keeps its regions
_PROBE = """
import importlib.metadata, importlib.util, json, sys
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
spec = importlib.util.find_spec("pytriton")
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "numpy": version("numpy"),
                  "pytriton": spec and spec.submodule_search_locations[0],
                  "onnxruntime": importlib.util.find_spec("onnxruntime") is not None}))
"""


@dataclass(frozen=True)
class TritonEnv:
    """An environment with nvidia-pytriton, numpy < 2 and onnxruntime: where Triton's parts are."""

    prefix: Path
    python: str  # "3.11": which backend stub fits
    package: Path  # SITE/pytriton

    @property
    def server(self) -> Path:
        return self.package / "tritonserver" / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.package / "tritonserver" / "backends" / "python"

    @property
    def stub(self) -> Path:
        return self.package / "tritonserver" / "python_backend_stubs" / self.python / "triton_python_backend_stub"

    @property
    def libraries(self) -> Path:
        return self.package.parent / "nvidia_pytriton.libs"


def triton_env(prefix: str | os.PathLike) -> TritonEnv:
    """The Triton parts of the environment ``prefix``; :class:`MocoError` saying how to set it
    up when something is missing or numpy is 2 or later."""
    prefix = Path(prefix).absolute()
    python = prefix / "bin" / "python"
    if not python.is_file():
        raise MocoError(f"{prefix} is not a Python environment (it has no bin/python); create one: {SETUP}")
    probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120)
    if probe.returncode:
        raise MocoError(f"{python} does not run ({probe.stderr.strip()[-500:]}); create the environment "
                        f"again: {SETUP}")
    facts = json.loads(probe.stdout)
    if not facts["pytriton"]:
        raise MocoError(f"{prefix} has no nvidia-pytriton, which ships tritonserver: {SETUP}")
    if facts["numpy"] is None or int(facts["numpy"].split(".")[0]) >= 2:
        raise MocoError(f"{prefix} has numpy {facts['numpy']}; Triton's python backend needs numpy < 2 "
                        f"(with numpy 2 inputs arrive as zeros): {prefix}/bin/pip install 'numpy<2'")
    if not facts["onnxruntime"]:
        raise MocoError(f"{prefix} has no onnxruntime, which moco's model.py runs: "
                        f"{prefix}/bin/pip install onnxruntime")
    env = TritonEnv(prefix, facts["python"], Path(facts["pytriton"]))
    missing = [str(path) for path in (env.server, env.python_backend, env.stub, env.libraries) if not path.exists()]
    if missing:
        raise MocoError(f"nvidia-pytriton in {prefix} lacks {', '.join(missing)} (it ships stubs for Python "
                        f"3.8 to 3.13; this is {env.python}): {SETUP}")
    return env


class TritonServer:
    """``tritonserver`` serving the model repository ``repository`` from the environment ``env``.

    Ports 0 are chosen free at :meth:`start`; :attr:`ports` then maps ``http``, ``grpc`` and
    ``metrics`` to the ports in use and :meth:`address` gives ``host:port`` for tritonclient.
    Use ``with TritonServer(...) as server:`` to stop it however the block ends.
    """

    def __init__(self, repository: str | os.PathLike, env: str | os.PathLike, http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int = 0, host: str = "127.0.0.1") -> None:
        self.repository = Path(repository)
        self.env = env
        self.host = host
        self.requested = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen | None = None
        self._workspace: tempfile.TemporaryDirectory | None = None
        self._log = ""

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def address(self, service: str) -> str:
        """``host:port`` of ``service`` (http, grpc or metrics) of the running server."""
        return f"{self.host}:{self.ports[service]}"

    def start(self, timeout: float = 60.0) -> TritonServer:
        """Start the server and wait until it and every model in the repository are ready;
        :class:`MocoError` with its last errors when it exits or is not ready within ``timeout``
        seconds (the server is stopped then)."""
        if self.process is not None:
            raise MocoError("this TritonServer is already started; stop it first")
        env = triton_env(self.env)
        if not self.repository.is_dir():
            raise MocoError(f"{self.repository} is not a directory; give the model repository "
                            "`moco export-triton --repository` wrote")
        self.ports = _ports(self.host, self.requested)
        self._workspace = tempfile.TemporaryDirectory(prefix="moco-triton-")
        workspace = Path(self._workspace.name)
        command = [str(env.server), f"--model-repository={self.repository.absolute()}",
                   f"--backend-directory={_backend_directory(env, workspace)}",
                   f"--backend-config=python,shm-region-prefix-name={_shm_prefix(workspace)}",
                   "--exit-timeout-secs=5", "--allow-gpu-metrics=false"]
        command += [f"--{service}-{flag}={value}" for service in SERVICES
                    for flag, value in (("address", self.host), ("port", self.ports[service]))]
        with open(workspace / "tritonserver.log", "wb") as log:
            self.process = subprocess.Popen(command, env=_server_environment(env), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        """The server's log so far (after :meth:`stop`: all of it)."""
        if self._workspace is None:
            return self._log
        return (Path(self._workspace.name) / "tritonserver.log").read_text(errors="replace")

    def errors(self, count: int = 3) -> str:
        """The last ``count`` error lines of the server's log, each cut at 500 characters (the end
        of the log when it has none)."""
        log = self.log()
        errors = [line[:500] for line in log.splitlines() if re.match(r"E\d{4} |error: ", line)]
        return "\n".join(errors[-count:]) or log[-1000:]

    def wait(self) -> int:
        """Wait until the server exits by itself; its exit status."""
        return self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """End the server's process group (SIGTERM, SIGKILL after ``timeout`` seconds) and remove
        its workspace and shared-memory regions; does nothing when it is not running."""
        if self.process is not None:
            _end_group(self.process, timeout)
            self.process = None
        if self._workspace is not None:
            for region in SHARED_MEMORY.glob(_shm_prefix(Path(self._workspace.name)) + "*"):
                region.unlink(missing_ok=True)  # left behind when the server had to exit before cleaning up
            self._log = self.log()
            self._workspace.cleanup()
            self._workspace = None

    def _wait_ready(self, timeout: float) -> None:
        """Poll the HTTP readiness endpoint until it answers 200, the process exits or ``timeout``."""
        url = f"http://{self.address('http')}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MocoError(f"tritonserver exited with status {self.process.returncode} before it was "
                                f"ready; its last errors:\n{self.errors()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:  # not listening yet, or 400 while models load
                pass
            time.sleep(0.2)
        raise MocoError(f"tritonserver was not ready after {timeout:.0f} s; its last errors:\n{self.errors()}")


def _ports(host: str, requested: dict[str, int]) -> dict[str, int]:
    """The requested port of each service when it is free on ``host``, a free one for 0 (all
    distinct); :class:`MocoError` when one is out of range or in use."""
    with ExitStack() as stack:
        ports = {}
        for service, port in requested.items():
            if not 0 <= port <= 65535:
                raise MocoError(f"port {port} for Triton's {service} service is not a port number; give 0 to 65535 "
                                "(0 picks a free one)")
            if port and port in ports.values():
                raise MocoError(f"port {port} is given to two of Triton's services; give each its own")
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                probe.bind((host, port))
            except OSError as error:
                raise MocoError(f"cannot use port {port} on {host} for Triton's {service} service "
                                f"({error.strerror}); stop what uses it or choose another port (0 picks a free "
                                "one)") from error
            ports[service] = probe.getsockname()[1]
        return ports


def _shm_prefix(workspace: Path) -> str:
    """The python backend's shared-memory region names for the server of ``workspace``."""
    return f"moco-triton-{os.getpid()}-{workspace.name}"


def _backend_directory(env: TritonEnv, workspace: Path) -> Path:
    """A backend directory in ``workspace``: the python backend plus the stub for the env's Python."""
    backends = workspace / "backends"
    shutil.copytree(env.python_backend, backends / "python", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(env.stub, backends / "python" / "triton_python_backend_stub")
    return backends


def _server_environment(env: TritonEnv) -> dict[str, str]:
    """This process's environment with the env's bin/ first on PATH and its libraries loadable;
    PYTHONPATH and PYTHONHOME dropped, so the stub's Python sees only the env's packages."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    environment["PATH"] = os.pathsep.join([str(env.prefix / "bin"), environment.get("PATH", "")])
    environment["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [environment.get("LD_LIBRARY_PATH"),
                                                                   str(env.libraries)]))
    return environment


def _end_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group led by ``process`` and wait up to ``timeout`` seconds for the
    leader; then SIGKILL what is left of the group (the leader, or python-backend stubs it leaves
    running when it exits before stopping them, e.g. after its exit timeout) and wait, up to
    ``timeout`` seconds again, until the group is gone."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + timeout
    while _signal_group(process.pid, 0) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal_group(group: int, sig: int) -> bool:
    """Send ``sig`` to the process group ``group``; whether the group still exists."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return False
    return True
