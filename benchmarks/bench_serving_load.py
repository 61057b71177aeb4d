"""Serving under load (issue 27 items 3 and 5): perf_analyzer against Triton serving the original model,
the compiled single graph and the staged repository, on the reference CNN and the 6-block MiniLM.

    python benchmarks/bench_serving_load.py --setup            # installs only: Triton env, perf_analyzer (pip)
    python benchmarks/bench_serving_load.py                    # load: both references, concurrency 1 4 16 32
    python benchmarks/bench_serving_load.py --soak             # 2 min at concurrency 32, RSS of the server group
    python benchmarks/bench_serving_load.py --references cnn --concurrency 1 16 --interval-ms 1000 --no-write

Each reference model is compiled at the default budget (``measure_latency=False``; a build already
in ``--work`` is reused unless ``--recompile``) and exported three ways, all python backend, one CPU
instance, max batch 64, dynamic batching alike (``benchmarks/serving_load.py`` says how).  Each
variant gets a server of its own (``TritonServer``: loopback, free ports, stopped however the run
ends).  perf_analyzer sends requests of one real held-out row each (``--input-data`` JSON, ``--rows``
distinct rows cycled: random tensors exit at rates no traffic has), gRPC, closed loop at each
concurrency, and reports throughput and p50 / p99 latency.  Targets (CPU): the single graph and the
staged repository each >= 1.3x the original's throughput at concurrency 16 with a p99 no worse.

``--soak`` serves one variant (``--soak-variant``, default staged) under perf_analyzer at
concurrency 32 for ``--warmup-seconds`` + ``--soak-seconds`` and checks that no request failed
(perf_analyzer's status, the server's own success / failure counters over every model) and that
the RSS of the server's process group (the server and its python-backend stubs, /proc) grew
< 5% from the end of warm-up to the end.  Results go to RESULTS.md, "Serving under load"
(subsections "Load" and "Soak"), unless ``--no-write``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import serving_load as sl  # noqa: E402
from benchmarks.results import machine_description, write_subsections  # noqa: E402
from moco_compile.runtime.triton.server import TritonServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Serving under load"
TARGET_SPEEDUP, TARGET_CONCURRENCY = 1.3, 16
INTRO = ("Issue 27 items 3 and 5: Triton (`tritonserver` 2.51 from nvidia-pytriton 0.7.0, python backend running "
         "onnxruntime, loopback) under load from NVIDIA's `perf_analyzer`, fed real held-out rows. "
         "`python benchmarks/bench_serving_load.py [--soak]`; how each model is served: "
         "`benchmarks/serving_load.py`.")


@dataclass
class Reference:
    """A reference model: its ONNX file, its calibration rows and held-out rows (inputs only)."""

    name: str
    onnx_path: Path
    calibration: dict[str, np.ndarray]
    test_rows: dict[str, np.ndarray]
    rows_note: str


def cnn_reference(work: Path) -> Reference:
    """The reference CNN: calibration = the shipped 10,000 held-out training images, test rows =
    Fashion-MNIST's test split when installed, else the shipped rows after the first 5,000
    (then calibrating on the first 5,000)."""
    from models.export_fashion_resnet import CALIBRATION_PATH, ONNX_PATH
    from models.fashion_mnist import load_split

    with np.load(CALIBRATION_PATH) as data:
        calibration = {name: data[name] for name in data.files}
    try:
        images, _ = load_split("test")
        note = "Fashion-MNIST test split"
    except FileNotFoundError:
        images = calibration["images"][5000:]
        calibration = {name: values[:5000] for name, values in calibration.items()}
        note = "the shipped calibration rows after the first 5,000 (calibrated on the first 5,000)"
    return Reference("cnn", ONNX_PATH, calibration, {"images": images.astype(np.float32)}, note)


def minilm_reference(work: Path) -> Reference:
    """The 6-block MiniLM reference (``minilm6_rt``), exported once into ``work``."""
    from models.text_classifier import load_reference_model, reference_tokens

    path = work / "minilm6_rt.onnx"
    if not path.is_file():
        from moco_compile.importer import export_hf_sequence_classifier

        sl.log("exporting minilm6_rt to ONNX")
        onnx.save(export_hf_sequence_classifier(load_reference_model("minilm6_rt")), str(path))
    test = reference_tokens("test", "minilm6_rt")
    inputs = [value.name for value in onnx.load(str(path), load_external_data=False).graph.input]
    return Reference("minilm6", path, reference_tokens("calibration", "minilm6_rt"),
                     {name: test[name] for name in inputs}, "`reference_tokens('test', 'minilm6_rt')`")


REFERENCES = {"cnn": cnn_reference, "minilm6": minilm_reference}


def build(reference: Reference, work: Path, recompile: bool) -> tuple[Path, Path, dict]:
    """(the compiled build, the original-as-build, report.json) of ``reference`` under ``work``."""
    from moco_compile import compile

    out = work / "builds" / reference.name
    if recompile or not (out / "report.json").is_file():
        sl.log(f"compiling {reference.name} (default budget)")
        compile(reference.onnx_path, reference.calibration, out_dir=out, measure_latency=False, force=True)
    else:
        sl.log(f"reusing the build {out} (--recompile to compile again)")
    original = sl.write_original_build(reference.onnx_path, work / "builds" / f"{reference.name}_original")
    return out, original, json.loads((out / "report.json").read_text())


def serve_and_measure(tools: sl.Tools, repository: Path, model: str, data: Path, concurrencies: list[int],
                      interval_ms: int, work: Path) -> tuple[list[sl.Point], dict[str, float], dict[str, float]]:
    """Serve ``repository`` and measure ``model`` at each concurrency; (points, rows per exit,
    failed requests per model)."""
    with TritonServer(repository, tools.env) as server:
        grpc = server.address("grpc")
        points = []
        for concurrency in concurrencies:
            sl.log(f"{model}: perf_analyzer at concurrency {concurrency}")
            point = sl.measure(tools, model, grpc, data, concurrency, interval_ms, work / "perf", work)
            sl.log(f"{model} c={concurrency}: {point.throughput:.1f} infer/s, p50 {point.p50_ms:.2f} ms, "
                   f"p99 {point.p99_ms:.2f} ms {point.note}")
            points.append(point)
        text = sl.metrics(server)
    return points, sl.exit_rows(text, model), sl.counter_sums(text, "nv_inference_request_failure")


def load_mode(args: argparse.Namespace, tools: sl.Tools) -> str:
    """Measure every reference and variant; the "Load" subsection."""
    tables, verdicts, commands, notes = [], [], [], []
    for key in args.references:
        reference = REFERENCES[key](args.work)
        build_dir, original_dir, report = build(reference, args.work, args.recompile)
        data = args.work / f"{key}_rows.json"
        rows = sl.write_input_data(data, {name: values[:args.rows] for name, values in reference.test_rows.items()})
        results: dict[str, list[sl.Point]] = {}
        exits: dict[str, dict[str, float]] = {}
        for variant in args.variants:
            name = f"{key}_{variant}"
            repository = args.work / "repos" / name
            sl.export_variant(variant, build_dir, original_dir, repository, name)
            points, exits[variant], failures = serve_and_measure(tools, repository, name, data, args.concurrency,
                                                                 args.interval_ms, args.work)
            if any(failures.values()):
                notes.append(f"{name}: failed requests per model {failures}")
            results[variant] = points
            commands.append(points[0].command)
        tables.append(_table(key, reference, report, rows, results, exits))
        verdicts += _verdicts(key, results)
    body = ["### Load: throughput and p50 / p99 latency under perf_analyzer", "",
            f"Machine: {machine_description()}. Client: {tools.version}, installed by {tools.origin}.",
            "Each request carries one row (`-b 1`); concurrency = requests in flight (closed loop, gRPC). "
            f"Windows of {args.interval_ms} ms until three agree within 10%, at most 6; else windows twice as long "
            "within 20%, else three of those as they come (noted). "
            "Server queue / infer: the server's mean per request (perf_analyzer's server-side statistics) in the "
            "dynamic batcher's queue and in model.py's execute. Ratios are against the original served the same way. "
            "The staged repository: 4 entry instances, stage models' onnxruntime threads not spinning "
            "(`runtime/triton/staged.py` rules 2 and 3). The client shares the 2 cores with the server.", ""]
    body += tables + ["Targets (>= 1.3x the original's throughput at concurrency 16, p99 no worse):", ""]
    body += [f"- {line}" for line in verdicts] + [""] + [f"- {note}" for note in notes]
    body += ["", "Commands (one per variant; `--concurrency-range` took each level, PORT chosen free):", "", "```"]
    body += commands + ["```"]
    return "\n".join(body)


def _table(key: str, reference: Reference, report: dict, rows: int, results: dict[str, list[sl.Point]],
           exits: dict[str, dict[str, float]]) -> str:
    """One reference's table, with the exit rates the served rows took."""
    reduction = report.get("compute_reduction") or report.get("plan", {}).get("compute_reduction")
    lines = [f"**{key}** ({rows} distinct rows of {reference.rows_note}, cycled"
             + (f"; compiled: {100 * reduction:.1f}% less compute" if isinstance(reduction, float) else "") + ")", "",
             "| variant | concurrency | infer/s | p50 ms | p99 ms | server queue ms | server infer ms "
             "| throughput vs original | p99 vs original |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {point.concurrency: point for point in results.get("original", [])}
    for variant, points in results.items():
        for point in points:
            original = base.get(point.concurrency)
            ratio = f"{point.throughput / original.throughput:.2f}x" if original and variant != "original" else ""
            p99 = f"{point.p99_ms / original.p99_ms:.2f}x" if original and variant != "original" else ""
            note = f" ({point.note})" if point.note else ""
            lines.append(f"| {variant} | {point.concurrency} | {point.throughput:.1f}{note} | {point.p50_ms:.2f} | "
                         f"{point.p99_ms:.2f} | {point.queue_ms:.2f} | {point.infer_ms:.2f} | {ratio} | {p99} |")
    for variant, counts in exits.items():
        total = sum(counts.values())
        if total and variant != "original":
            shares = ", ".join(f"exit {k}: {100 * v / total:.1f}%"
                               for k, v in sorted(counts.items(), key=lambda kv: int(kv[0])))
            lines.append(f"\n{variant}: rows served per exit ({total:.0f} rows; -1 = full network): {shares}")
    return "\n".join(lines) + "\n"


def _verdicts(key: str, results: dict[str, list[sl.Point]]) -> list[str]:
    """Target verdicts at concurrency 16 for the graph and staged variants."""
    original = {p.concurrency: p for p in results.get("original", [])}.get(TARGET_CONCURRENCY)
    lines = []
    for variant in ("graph", "staged"):
        point = {p.concurrency: p for p in results.get(variant, [])}.get(TARGET_CONCURRENCY)
        if original is None or point is None or math.isnan(point.throughput) or math.isnan(original.throughput):
            lines.append(f"{key} {variant}: not measured at concurrency {TARGET_CONCURRENCY}")
            continue
        speedup = point.throughput / original.throughput
        met = speedup >= TARGET_SPEEDUP and point.p99_ms <= original.p99_ms
        lines.append(f"{key} {variant}: {speedup:.2f}x throughput, p99 {point.p99_ms:.1f} ms vs "
                     f"{original.p99_ms:.1f} ms: {'met' if met else 'missed'}")
    return lines


def soak_mode(args: argparse.Namespace, tools: sl.Tools) -> str:
    """The soak; the "Soak" subsection."""
    key = args.soak_reference
    reference = REFERENCES[key](args.work)
    build_dir, original_dir, _ = build(reference, args.work, args.recompile)
    data = args.work / f"{key}_rows.json"
    sl.write_input_data(data, {name: values[:args.rows] for name, values in reference.test_rows.items()})
    variant = args.soak_variant
    name = f"{key}_{variant}"
    repository = args.work / "repos" / name
    sl.export_variant(variant, build_dir, original_dir, repository, name)
    total = args.warmup_seconds + args.soak_seconds
    interval = int(1000 * total / 3)  # three windows, all accepted: -s 100
    report = args.work / "perf" / f"{name}_soak.csv"
    with TritonServer(repository, tools.env) as server:
        command = sl.perf_command(tools, name, server.address("grpc"), data, 32, interval, report,
                                  max_trials=3, stability=100)
        before = sl.metrics(server)
        sampler = sl.RssSampler(server.process.pid, every=2.0).start()
        sl.log(f"soak: {name} at concurrency 32 for {total:.0f} s (warm-up {args.warmup_seconds:.0f} s)")
        processes = sl.group_processes(server.process.pid)
        sl.log("server process group: " + ", ".join(f"{pid} {comm} {rss / 2**20:.0f} MiB"
                                                    for pid, comm, rss in processes))
        started = time.monotonic()
        row, output, status = sl.run_perf(tools, command, report, timeout=total * 1.5 + 120)
        elapsed = time.monotonic() - started
        samples = sampler.stop()
        after = sl.metrics(server)
    success = _delta(sl.counter_sums(before, "nv_inference_request_success"),
                     sl.counter_sums(after, "nv_inference_request_success"))
    failure = _delta(sl.counter_sums(before, "nv_inference_request_failure"),
                     sl.counter_sums(after, "nv_inference_request_failure"))
    warm = [rss for t, rss in samples if t >= args.warmup_seconds]
    baseline, final, peak = warm[0], warm[-1], max(warm)
    growth = (final - baseline) / baseline
    counted = sum(int(c) for c in re.findall(r"Request count: (\d+)", output))
    errors = [line for line in output.splitlines() if "error" in line.lower() or "failed" in line.lower()]
    lost = success.get(name, 0.0) < counted  # the server answered fewer requests than the client counted
    ok = status == 0 and not any(failure.values()) and not errors and not lost and growth < 0.05
    sl.log(f"soak: exit {status}, served {success}, failed {failure}, RSS {baseline / 2**20:.1f} -> "
           f"{final / 2**20:.1f} MiB (peak {peak / 2**20:.1f})")
    throughput = f"{float(row['Inferences/Second']):.1f} infer/s" if row else "no report"
    lines = [f"### Soak: {total:.0f} s at concurrency 32 ({name})", "",
             f"Machine: {machine_description()}. {tools.version}. {args.warmup_seconds:.0f} s warm-up, then "
             f"{args.soak_seconds:.0f} s; RSS summed over the server's process group (tritonserver and its "
             "python-backend stubs) from /proc every 2 s.", "",
             f"- perf_analyzer: exit status {status}, {throughput}, {counted} requests counted in its windows, "
             f"{len(errors)} error lines{': ' + errors[0][:200] if errors else ''}; ran {elapsed:.0f} s",
             f"- server counters over the run (every model): succeeded {_fmt(success)}, failed {_fmt(failure)}"
             f"{' (fewer than the client counted: lost requests)' if lost else ''}",
             f"- RSS after warm-up {baseline / 2**20:.1f} MiB, at the end {final / 2**20:.1f} MiB, peak "
             f"{peak / 2**20:.1f} MiB: growth {100 * growth:+.2f}% (target < 5%)",
             f"- processes summed: {', '.join(sorted(comm for _, comm, _ in processes))}",
             f"- verdict: {'met' if ok else 'missed'} (no failed request and RSS growth < 5%)"]
    lines += ["", "```", sl.shown_command(command, args.work), "```"]
    (args.work / "soak_rss.json").write_text(json.dumps(samples))
    return "\n".join(lines)


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {model: after[model] - before.get(model, 0.0) for model in after}


def _fmt(counts: dict[str, float]) -> str:
    return ", ".join(f"{model} {value:.0f}" for model, value in sorted(counts.items())) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true",
                        help="install the Triton env and perf_analyzer (pip), then stop")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "serving-load")
    parser.add_argument("--env", type=Path, default=ROOT / ".triton-env")
    parser.add_argument("--references", nargs="+", choices=list(REFERENCES), default=list(REFERENCES))
    parser.add_argument("--variants", nargs="+", choices=sl.VARIANTS, default=list(sl.VARIANTS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 32])
    parser.add_argument("--interval-ms", type=int, default=4000, help="perf_analyzer --measurement-interval")
    parser.add_argument("--rows", type=int, default=1000, help="distinct held-out rows in the --input-data JSON")
    parser.add_argument("--recompile", action="store_true")
    parser.add_argument("--soak", action="store_true")
    parser.add_argument("--soak-reference", choices=list(REFERENCES), default="cnn")
    parser.add_argument("--soak-variant", choices=sl.VARIANTS, default="staged")
    parser.add_argument("--soak-seconds", type=float, default=120.0)
    parser.add_argument("--warmup-seconds", type=float, default=20.0)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()
    args.work = args.work.absolute()
    (args.work / "perf").mkdir(parents=True, exist_ok=True)
    if args.setup:
        tools = sl.setup_tools(args.work, args.env)
        print(f"{tools.version} from {tools.origin}")
        return
    tools = sl.find_tools(args.work, args.env)
    sl.log(f"{tools.version} ({tools.perf_analyzer})")
    started = time.monotonic()
    key, body = ("Soak", soak_mode(args, tools)) if args.soak else ("Load", load_mode(args, tools))
    sl.log(f"done in {time.monotonic() - started:.0f} s")
    print(body)
    if not args.no_write:
        write_subsections(SECTION, INTRO, {key: body})


if __name__ == "__main__":
    main()
