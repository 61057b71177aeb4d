"""Serving under load: the client, the three Triton repositories and what is measured on them
(used by ``bench_serving_load.py``).

The load client is NVIDIA's ``perf_analyzer`` (C++), not code of ours.  Where it comes from:

1. PyPI ``perf-analyzer`` 2.58 to 2.60 ship it as ``manylinux_2_38`` wheels (glibc >= 2.38,
   GLIBCXX_3.4.32); ``perf-analyzer`` 0.1.0, the only release pip offers on an older glibc, is an
   empty placeholder.  :func:`setup_tools` tries it first.
2. Else the ``tritonclient`` 2.51.0 wheel (the release of the ``tritonserver`` that
   ``nvidia-pytriton`` 0.7.0 ships; tritonclient 2.61 and later no longer carry it) has
   ``bin/perf_analyzer``, built for glibc 2.35.  It links ``libb64.so.0d`` and
   ``libcudart.so.12``, which the ``nvidia-pytriton`` wheel already vendors under hashed names
   (``nvidia_pytriton.libs/libb64-*.so.0d``, ``libcudart-*.so.12.*``): links with the plain
   names in a directory on ``LD_LIBRARY_PATH`` let it load.

Nothing downloads while measuring: :func:`setup_tools` (``--setup``) does every install, with pip.

Three Triton models per reference model, each the python backend running onnxruntime with the same
:data:`SETTINGS` (max batch, one CPU instance, dynamic batching preferring full batches, 100 us queue
delay; the staged entry model: ``ENTRY_INSTANCES`` instances): ``original`` (:func:`write_original_build`: the original graph plus a constant ``moco_exit``
of -1, so that the same model.py, configuration and per-request exit counting serve it),
``graph`` (the compiled single graph, ``export_triton``) and ``staged`` (``export_triton_staged``: the
entry model NAME and one model NAME_stage<k> per stage).
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import venv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from moco_compile.constants import EXIT_OUTPUT
from moco_compile.errors import MocoError
from moco_compile.outputs import staged_output_dir
from moco_compile.runtime.triton.repository import TritonSettings, export_triton
from moco_compile.runtime.triton.server import TritonServer, triton_env
from moco_compile.stage_models import export_triton_staged

TRITON_PACKAGES = ["nvidia-pytriton==0.7.0", "numpy<2", "onnxruntime"]  # as tests/test_triton_server.py
PERF_ANALYZER_PACKAGE = "perf-analyzer>=2.58"  # manylinux_2_38 wheels only
PERF_ANALYZER_FALLBACK = "tritonclient==2.51.0"  # ships bin/perf_analyzer, built for glibc 2.35
VARIANTS = ("original", "graph", "staged")
SETTINGS = {"max_batch_size": 64, "instances": 1, "kind": "cpu", "backend": "python"}


def log(message: str) -> None:
    """Progress on stderr, at once."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class Tools:
    """The Triton environment and the perf_analyzer binary (with the libraries it loads)."""

    env: Path
    perf_analyzer: Path
    libraries: Path | None  # for LD_LIBRARY_PATH, None when the binary needs none
    version: str  # "Perf Analyzer Version 2.51.0 (commit unknown)"
    origin: str  # how it was installed, for RESULTS

    def environment(self) -> dict[str, str]:
        """The environment perf_analyzer runs in."""
        environment = dict(os.environ)
        if self.libraries is not None:
            environment["LD_LIBRARY_PATH"] = os.pathsep.join(
                filter(None, [str(self.libraries), environment.get("LD_LIBRARY_PATH")]))
        return environment


def _pip(python: Path, *arguments: str) -> subprocess.CompletedProcess:
    log(f"pip install {' '.join(arguments)}")
    return subprocess.run([str(python), "-m", "pip", "install", "-q", *arguments], capture_output=True, text=True,
                          timeout=900)


def setup_tools(work: Path, env: Path) -> Tools:
    """Install what the benchmark needs (the only step that downloads): the Triton environment
    ``env`` (as the Triton tests build it) and perf_analyzer under ``work/perf-analyzer``."""
    try:
        triton_env(env)
    except MocoError:
        log(f"creating the Triton environment {env}")
        venv.EnvBuilder(with_pip=True).create(env)
        result = _pip(env / "bin" / "python", *TRITON_PACKAGES)
        if result.returncode:
            raise MocoError(f"could not install {TRITON_PACKAGES} into {env}: {result.stderr[-1000:]}")
        triton_env(env)
    prefix = work / "perf-analyzer"
    python = env / "bin" / "python"
    if _pip(python, "--no-deps", "--prefix", str(prefix), PERF_ANALYZER_PACKAGE).returncode:
        log(f"no {PERF_ANALYZER_PACKAGE} wheel for this platform (they need glibc >= 2.38); "
            f"falling back to the binary in {PERF_ANALYZER_FALLBACK}")
        result = _pip(python, "--no-deps", "--prefix", str(prefix), PERF_ANALYZER_FALLBACK)
        if result.returncode:
            raise MocoError(f"could not install {PERF_ANALYZER_FALLBACK}: {result.stderr[-1000:]}")
    return find_tools(work, env)


def _library_links(env: Path, directory: Path) -> Path:
    """``directory`` with ``libb64.so.0d`` and ``libcudart.so.12`` linked to the copies the
    nvidia-pytriton wheel vendors in ``env``."""
    libraries = triton_env(env).libraries
    directory.mkdir(parents=True, exist_ok=True)
    for name, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        found = sorted(glob.glob(str(libraries / pattern)))
        if not found:
            raise MocoError(f"{libraries} has no {pattern}, which perf_analyzer loads as {name}; "
                            f"reinstall the environment: {' '.join(TRITON_PACKAGES)}")
        link = directory / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[-1])
    return directory


def _shown(path: Path) -> str:
    """``path`` relative to the checkout when it lies inside it (what RESULTS shows)."""
    root = Path(__file__).resolve().parents[1]
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def find_tools(work: Path, env: Path) -> Tools:
    """perf_analyzer as :func:`setup_tools` left it (or on ``PATH``), checked by running
    ``--version``; :class:`MocoError` naming the setup command otherwise."""
    triton_env(env)
    prefix = work / "perf-analyzer"
    candidates = []
    on_path = shutil.which("perf_analyzer")
    if on_path:
        candidates.append((Path(on_path), None, "perf_analyzer on PATH"))
    for wheel_binary in sorted(prefix.glob("lib/python*/site-packages/perf_analyzer/bin/perf_analyzer")):
        candidates.append((wheel_binary, None, f"pip install --prefix {_shown(prefix)} '{PERF_ANALYZER_PACKAGE}'"))
    if (prefix / "bin" / "perf_analyzer").is_file():
        candidates.append((prefix / "bin" / "perf_analyzer", _library_links(env, prefix / "lib-links"),
                           f"pip install --no-deps --prefix {_shown(prefix)} {PERF_ANALYZER_FALLBACK} (its "
                           "bin/perf_analyzer; libb64 and libcudart linked from nvidia-pytriton's vendored copies)"))
    failures = []
    for binary, libraries, origin in candidates:
        tools = Tools(env, binary, libraries, "", origin)
        probe = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30,
                               env=tools.environment())
        said = (probe.stdout + probe.stderr).strip()  # 2.51 prints its version on stderr
        if probe.returncode == 0 and "Version" in said:
            return Tools(env, binary, libraries, said.splitlines()[-1], origin)
        failures.append(f"{binary}: {(probe.stderr or probe.stdout).strip()[:300]}")
    raise MocoError("no working perf_analyzer" + (f" ({'; '.join(failures)})" if failures else "")
                    + "; run `python benchmarks/bench_serving_load.py --setup` first")


# ------------------------------------------------------------------------------------- repositories


def write_original_build(model_path: Path, out_dir: Path) -> Path:
    """A build directory (manifest included) whose model.onnx is the original graph plus
    ``moco_exit`` = -1 for every row (Shape -> ConstantOfShape), so that ``export_triton``
    serves the original exactly as it serves compiled graphs."""
    model = onnx.load(str(model_path))
    graph = model.graph
    first = graph.input[0]
    batch = first.type.tensor_type.shape.dim[0]
    graph.node.extend([
        helper.make_node("Shape", [first.name], ["moco_original_batch"], name="moco_original_batch", start=0, end=1),
        helper.make_node("ConstantOfShape", ["moco_original_batch"], [EXIT_OUTPUT], name="moco_original_exit",
                         value=helper.make_tensor("value", TensorProto.INT64, [1], [-1]))])
    graph.output.append(helper.make_tensor_value_info(
        EXIT_OUTPUT, TensorProto.INT64, [batch.dim_param or "batch"]))
    if not any(opset.domain in ("", "ai.onnx") and opset.version >= 15 for opset in model.opset_import):
        raise MocoError(f"{model_path} imports ONNX opset < 15; Shape(start, end) needs 15")
    onnx.checker.check_model(model)
    with staged_output_dir(out_dir, [model_path], force=True) as staging:
        onnx.save(model, str(staging / "model.onnx"))
    return out_dir


def export_variant(variant: str, build: Path, original_build: Path, repository: Path, name: str) -> Path:
    """Export ``variant`` of a reference model as ``repository/name`` (the staged one also writes
    its stage models ``name_stage<k>`` beside it).
    ``repository`` is the benchmark's own: written afresh (Triton leaves __pycache__ in model.py's
    directory, which export_triton would refuse to replace)."""
    shutil.rmtree(repository, ignore_errors=True)
    settings = TritonSettings(**SETTINGS)
    if variant == "original":
        return export_triton(original_build, repository, name, settings)
    if variant == "graph":
        return export_triton(build, repository, name, settings)
    return export_triton_staged(build, repository, name, settings)[0]


# ------------------------------------------------------------------------------------- input data


def write_input_data(path: Path, rows: dict[str, np.ndarray]) -> int:
    """perf_analyzer's ``--input-data`` JSON: one entry per row (one request of batch 1 each, in
    order, cycled), every input with its content and its shape without the batch axis; the
    number of rows."""
    count = len(next(iter(rows.values())))
    entries = [{name: {"content": values[i].ravel().tolist(), "shape": list(values.shape[1:])}
                for name, values in rows.items()} for i in range(count)]
    path.write_text(json.dumps({"data": entries}, separators=(",", ":")))
    return count


# ---------------------------------------------------------------------------------------- measuring


@dataclass
class Point:
    """One perf_analyzer measurement at one concurrency."""

    concurrency: int
    throughput: float  # inferences (requests of one row) per second
    p50_ms: float
    p99_ms: float
    command: str
    requests: int | None = None  # as perf_analyzer counted them in its windows
    note: str = ""
    queue_ms: float = float("nan")  # the server's mean time per request in the batcher's queue
    infer_ms: float = float("nan")  # ... in the model's execute (model.py: onnxruntime and the copies around it)


def perf_command(tools: Tools, model: str, grpc: str, data: Path, concurrency: int, interval_ms: int,
                 report: Path, max_trials: int = 6, stability: int = 10) -> list[str]:
    """perf_analyzer over gRPC, batch 1, closed loop at ``concurrency`` requests in flight,
    ``--measurement-interval`` windows until three agree within ``stability`` percent."""
    return [str(tools.perf_analyzer), "-m", model, "-u", grpc, "-i", "grpc", "--input-data", str(data), "-b", "1",
            "--concurrency-range", f"{concurrency}", "--measurement-mode", "time_windows",
            "--measurement-interval", str(interval_ms), "--stability-percentage", str(stability),
            "--max-trials", str(max_trials), "-f", str(report)]


def shown_command(command: list[str], work: Path) -> str:
    """``command`` as RESULTS shows it: the binary as ``perf_analyzer``, paths relative to
    ``work``, the port as PORT."""
    shown = ["perf_analyzer"] + command[1:]
    text = " ".join(shown).replace(str(work) + "/", "")
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)


def run_perf(tools: Tools, command: list[str], report: Path, timeout: float) -> tuple[dict[str, str] | None, str, int]:
    """Run perf_analyzer; (its CSV row or None, its output, its exit status); its output is also
    kept beside ``report`` (.log)."""
    report.unlink(missing_ok=True)
    log_path = report.with_suffix(".log")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=tools.environment())
        output, status = done.stdout + done.stderr, done.returncode
        log_path.write_text(output)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else ""
        return None, output + f"\n(perf_analyzer stopped after {timeout:.0f} s)", 124
    if not report.is_file():
        return None, output, status
    with open(report, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return (rows[-1] if rows else None), output, status


def measure(tools: Tools, model: str, grpc: str, data: Path, concurrency: int, interval_ms: int,
            scratch: Path, work: Path) -> Point:
    """One point; when perf_analyzer finds no three windows within 10% it is asked again with windows
    twice as long and 20%, then to take three such windows as they come (``-s 100``: on a machine
    other work shares, some points never settle); the point says which."""
    report = scratch / f"{model}_c{concurrency}.csv"
    notes = {10: "", 20: "{} ms windows, stable within 20% only",
             100: "{} ms windows, NOT stable: 3 windows as they came"}
    for interval, stability in ((interval_ms, 10), (2 * interval_ms, 20), (2 * interval_ms, 100)):
        command = perf_command(tools, model, grpc, data, concurrency, interval, report, stability=stability)
        row, output, status = run_perf(tools, command, report, timeout=8 * interval / 1000 + 120)
        if row is not None and status == 0:
            counted = [int(count) for count in re.findall(r"Request count: (\d+)", output)]
            return Point(concurrency, float(row["Inferences/Second"]), float(row["p50 latency"]) / 1e3,
                         float(row["p99 latency"]) / 1e3, shown_command(command, work),
                         counted[-1] if counted else None, notes[stability].format(interval),
                         float(row["Server Queue"]) / 1e3, float(row["Server Compute Infer"]) / 1e3)
        log(f"perf_analyzer exit {status} at concurrency {concurrency} ({interval} ms, {stability}%): "
            f"{output.strip()[-200:]}")
    return Point(concurrency, float("nan"), float("nan"), float("nan"), shown_command(command, work),
                 note=f"no stable measurement (exit {status})")


def metrics(server: TritonServer) -> str:
    """The server's Prometheus metrics text."""
    with urllib.request.urlopen(f"http://{server.address('metrics')}/metrics", timeout=10) as response:
        return response.read().decode()


def counter_sums(text: str, name: str, model_prefix: str = "") -> dict[str, float]:
    """``name``'s values summed per model whose name starts with ``model_prefix``."""
    sums: dict[str, float] = {}
    for match in re.finditer(rf'^{name}{{([^}}]*)}} ([0-9.e+-]+)$', text, re.M):
        model = re.search(r'model="([^"]*)"', match.group(1))
        if model and model.group(1).startswith(model_prefix):
            sums[model.group(1)] = sums.get(model.group(1), 0.0) + float(match.group(2))
    return sums


def exit_rows(text: str, model: str) -> dict[str, float]:
    """Rows per exit (``"-1"`` = full network) counted by ``model``'s model.py."""
    rows: dict[str, float] = {}
    for match in re.finditer(r'^moco_exit_rows_total\{([^}]*)\} ([0-9.e+-]+)$', text, re.M):
        labels = match.group(1)
        if f'model="{model}"' in labels:
            exit_index = re.search(r'exit="([^"]*)"', labels).group(1)
            rows[exit_index] = rows.get(exit_index, 0.0) + float(match.group(2))
    return rows


def group_processes(group: int) -> list[tuple[int, str, int]]:
    """(pid, command name, resident bytes) of each process of the process group ``group`` (the
    server and its python-backend stubs), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            fields = text.rsplit(")", 1)[1].split()
            if int(fields[2]) != group:  # pgrp, the 5th field of /proc/PID/stat
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        name = text[text.index("(") + 1:text.rindex(")")]
        found.append((int(stat.parent.name), name, int(match.group(1)) * 1024 if match else 0))
    return found


def group_rss(group: int) -> int:
    """Resident memory (bytes) summed over the processes of the process group ``group``."""
    return sum(rss for _, _, rss in group_processes(group))


@dataclass
class RssSampler:
    """Samples :func:`group_rss` every ``every`` seconds in a thread until :meth:`stop`."""

    group: int
    every: float = 2.0
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - start, group_rss(self.group)))
            self._stop.wait(self.every)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self.samples
