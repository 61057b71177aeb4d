"""Benchmark: the bucketed layout and the stage runner on this CPU, beside the original and the nested graph.

    python benchmarks/bench_staged_cpu.py [--references minilm6_rt]

Each reference is compiled once at the default budget (the reference CNN on the first 5,000 rows of
its shipped calibration set, the text references on their calibration tokens); its certified plan
is written nested (the CPU default) and bucketed (``--target cuda``'s layout, buckets
1,8,16,32,64,128,256), and the bucketed build also runs through ``StagedSession`` (one session per
(stage, bucket), no CUDA graph on a CPU).  Both must route every row as the nested graph does, with
its class (checked first; their largest output difference is reported).  Latency: median seconds per batch
(``runtime.latency.time_sessions``: the four alternating in this process, 5 rounds) at batch 1, 64
and 256, and on batches whose sizes cycle 29, 37, 41, 53 (what a server's dynamic batcher sends),
as ratios to the original.  Writes the section "Stage runner and bucketed layout (CPU)" of
``benchmarks/RESULTS.md``; the GPU figures come from ``benchmarks/gpu_check.sh``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results import machine_description, write_section  # noqa: E402
from moco_compile import compile  # noqa: E402
from moco_compile.build import Build  # noqa: E402
from moco_compile.passes.graph.rewrite import apply_plan  # noqa: E402
from moco_compile.prepare import model_for_plan  # noqa: E402
from moco_compile.passes.planning.config import DEFAULT_BATCH_BUCKETS, PlannerConfig  # noqa: E402
from moco_compile.runtime.latency import time_sessions  # noqa: E402
from moco_compile.runtime.session import CPU, make_session  # noqa: E402
from moco_compile.runtime.staged import StagedSession  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Stage runner and bucketed layout (CPU)"
BATCHES = (1, 64, 256)
CYCLE = (29, 37, 41, 53)
SECONDS = 4.0  # per session and batch size
CNN_CALIBRATION_ROWS = 5000


class _StagedAsSession:
    """``StagedSession`` with the ``run(names, feed)`` of an onnxruntime session, for the timing helpers."""

    def __init__(self, staged: StagedSession) -> None:
        self.staged = staged

    def run(self, names, feed):
        outputs = self.staged.run(feed)
        return [outputs[name] for name in names or self.staged.output_names]


class _Cycling:
    """A session fed batches whose sizes cycle through :data:`CYCLE`: each call takes the next size's rows."""

    def __init__(self, session, rows: dict[str, np.ndarray]) -> None:
        self.session, self.rows, self.calls = session, rows, 0

    def run(self, names, feed):
        size = CYCLE[self.calls % len(CYCLE)]
        self.calls += 1
        return self.session.run(names, {name: values[:size] for name, values in self.rows.items()})


def reference(name: str, scratch: Path) -> tuple[onnx.ModelProto, Build, dict[str, np.ndarray]]:
    """The original model, its compile at the default budget and rows it was not calibrated on."""
    if name == "fashion_resnet":
        with np.load(ROOT / "models/artifacts/fashion_calib.npz") as data:
            rows = {name: data[name] for name in data.files}
        path = ROOT / "models/artifacts/fashion_resnet.onnx"
        calibration = {key: value[:CNN_CALIBRATION_ROWS] for key, value in rows.items()}
        held_out = {"images": rows["images"][CNN_CALIBRATION_ROWS:]}
    else:
        from models.text_classifier import load_reference_model, reference_tokens
        from moco_compile.importer import export_hf_sequence_classifier

        path = scratch / f"{name}.onnx"
        onnx.save(export_hf_sequence_classifier(load_reference_model(name)), str(path))
        calibration = reference_tokens("calibration", name)
        test = reference_tokens("test", name)
        held_out = {key: value for key, value in test.items() if key != "labels"}
    build = compile(path, calibration, measure_latency=False, show_progress=False)
    model, _ = model_for_plan(onnx.load(str(path)), None, {key: value[:1] for key, value in held_out.items()})
    return model, build, held_out


def graphs(original: onnx.ModelProto, build: Build) -> tuple[dict, dict]:
    """The sessions compared and the plan.json record the stage runner cuts the bucketed graph by."""
    output = next(o.name for o in original.graph.output)
    bucketed = apply_plan(original, build.plan, output, "bucketed", DEFAULT_BATCH_BUCKETS)
    record = Build(bucketed, build.plan, {}, None, exit_layout="bucketed",
                   planner_config=PlannerConfig(exit_layout="bucketed")).plan_record()
    sessions = {"original": make_session(original, [CPU]), "nested": make_session(build.model, [CPU]),
                "bucketed": make_session(bucketed, [CPU]),
                "staged": _StagedAsSession(StagedSession(bucketed, record, providers=["cpu"]))}
    return sessions, {"output": output}


def check(sessions: dict, rows: dict[str, np.ndarray], output: str) -> dict[str, float]:
    """The bucketed graph and the stage runner route every row as the nested graph does, with its class;
    returns each one's largest output difference from the nested graph (float rounding: other batch
    shapes, other onnxruntime fusions)."""
    worst = {"bucketed": 0.0, "staged": 0.0}
    for size in (1, 29, 64, 256):
        feed = {name: values[:size] for name, values in rows.items()}
        names = [output, "moco_exit"]
        logits, exits = sessions["nested"].run(names, feed)
        for form in worst:
            other_logits, other_exits = sessions[form].run(names, feed)
            assert (other_exits == exits).all(), f"{form} routes rows differently from nested at batch {size}"
            assert (other_logits.argmax(1) == logits.argmax(1)).all(), f"{form} changes a class at batch {size}"
            worst[form] = max(worst[form], float(np.abs(other_logits - logits).max()))
    return worst


def measure(name: str, scratch: Path) -> list[str]:
    original, build, rows = reference(name, scratch)
    sessions, facts = graphs(original, build)
    worst = check(sessions, rows, facts["output"])
    reduction = build.report.get("compute_reduction")
    lines = []
    for batch in (*BATCHES, "cycling"):
        if batch == "cycling":
            cycling = {form: _Cycling(session, rows) for form, session in sessions.items()}
            seconds = time_sessions(cycling, {k: v[:4 * len(CYCLE)] for k, v in rows.items()}, 1, SECONDS).seconds
            label = "/".join(map(str, CYCLE))
        else:
            seconds = time_sessions(sessions, rows, batch, SECONDS).seconds
            label = str(batch)
        base = seconds["original"]
        lines.append(f"| {name} | {len(build.plan.exits)} | {label} | {base * 1e3:.2f} | "
                     + " | ".join(f"{seconds[form] / base:.3f}" for form in ("nested", "bucketed", "staged")) + " |")
        print(lines[-1], flush=True)
    facts_line = (f"{name}: {len(build.plan.exits)} exits, certified compute reduction "
                  f"{_percent(reduction)} (report.json); largest output difference from the nested graph: "
                  f"bucketed {worst['bucketed']:.1e}, staged {worst['staged']:.1e}")
    return [facts_line, *lines]


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--references", nargs="*", default=["minilm6_rt"], help="text references to measure too")
    args = parser.parse_args()
    started = time.perf_counter()
    facts, rows = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for name in ["fashion_resnet", *args.references]:
            first, *lines = measure(name, Path(scratch))
            facts.append(first)
            rows.extend(lines)
    write_section(SECTION, "\n".join([
        f"Command: `python benchmarks/bench_staged_cpu.py --references {' '.join(args.references)}`  ",
        f"Machine: {machine_description()} ({time.perf_counter() - started:.0f} s in all)",
        "",
        "The default-budget plan (1% at 95%) of each reference, written nested (the CPU default) and bucketed "
        "(`--target cuda`'s layout, buckets 1,8,16,32,64,128,256), the bucketed build also served by "
        "`StagedSession` (one onnxruntime session per (stage, bucket), rows gathered between stages, no CUDA "
        "graph on a CPU). All were checked first to route every row as the nested graph does, with its class. "
        "Median seconds per batch, the four alternating in one process; ratios to the original (lower is "
        "faster). `cycling`: consecutive batches of 29, 37, 41 and 53 rows.",
        "",
        *[f"- {line}" for line in facts],
        "",
        "| model | exits | batch | original (ms) | nested / original | bucketed / original | staged / original |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The bucketed graph as one session pays on a CPU for its padding rows and for weights read from the "
        "outer scope (onnxruntime pre-packs only a subgraph's own): it is the GPU layout. The stage runner gives "
        "each (stage, bucket) its own session with its weights pre-packed and shapes fixed.",
    ]))


if __name__ == "__main__":
    main()
