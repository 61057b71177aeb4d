"""Render ``gpu_check.py``'s served-shape steps (``served_*``, ``bench_served_shapes.py``) as the subsection
"Served shapes" of the section "GPU (CUDA)" in ``benchmarks/RESULTS.md``, with issue 26's targets checked."""
from __future__ import annotations

from dataclasses import dataclass

SUBSECTION = "Served shapes"
SHAPE_NAMES = {"resnet50": "ResNet-50, 224x224", "bert_base": "BERT-base, 128 tokens"}
FLOPS_SHARE = 0.8  # compiled / original <= 1 - 0.8 x FLOPs reduction
TARGET_PROFILE = "50%"
TARGET_BATCHES = ("64", "256")
CLOSED_EXIT_MS = 0.05
STAGED_VS_GRAPH = 0.85  # the stage runner at batch 1 vs the CUDA-Graph original, BERT-base, 50% profile
CYCLING_VS_FIXED = 1.2  # the bucketed reference CNN, batch sizes cycling vs fixed
ORIGINAL, CUDA_GRAPH = "original", "original_cuda_graph"


@dataclass(frozen=True)
class Target:
    """One of issue 26's GPU targets as measured: what, the figure, the bound, and whether it is met."""

    what: str
    value: float
    bound: float

    @property
    def met(self) -> bool:
        return self.value <= self.bound


def _shapes(results: dict) -> dict[str, dict]:
    return {key[len("served_"):]: value for key, value in results.items()
            if key.startswith("served_") and key != "served_cycling" and not key.endswith("_seconds")
            and isinstance(value, dict) and "latency_ms" in value}


def _compiled(timings: dict) -> list[tuple[str, str]]:
    """(profile, layout) of every compiled runner timed."""
    return [tuple(name.split("/")) for name in timings if "/" in name]


def targets(results: dict) -> list[Target]:
    """Issue 26's served-shape targets that ``results`` holds figures for."""
    out = []
    for shape, r in _shapes(results).items():
        label = SHAPE_NAMES.get(shape, shape)
        for batch, t in r["latency_ms"].items():
            for profile, layout in _compiled(t):
                name = f"{profile}/{layout}"
                if profile == TARGET_PROFILE and batch in TARGET_BATCHES and name in r["realized"]:
                    reduction = r["realized"][name]["flops_reduction"]
                    out.append(Target(f"{label}, {name}, batch {batch}: compiled / original",
                                      t[name] / t[ORIGINAL], 1 - FLOPS_SHARE * reduction))
                if profile == "closed":
                    out.append(Target(f"{label}, closed exit, {layout}, batch {batch}: ms over the original",
                                      t[name] - t[ORIGINAL], CLOSED_EXIT_MS))
        one = r["latency_ms"].get("1", {})
        staged = f"{TARGET_PROFILE}/staged"
        if shape == "bert_base" and staged in one and CUDA_GRAPH in one:
            out.append(Target(f"{label}, {staged}, batch 1: stage runner / CUDA-Graph original",
                              one[staged] / one[CUDA_GRAPH], STAGED_VS_GRAPH))
    cycling = results.get("served_cycling", {}).get("ms_per_call", {})
    fixed = next((v for k, v in cycling.items() if k.startswith("fixed")), None)
    cycled = next((v for k, v in cycling.items() if k.startswith("cycling")), None)
    if fixed and cycled:
        for name in ("certified/bucketed", "certified/staged"):
            if name in fixed and name in cycled:
                out.append(Target(f"reference CNN, {name}: cycling / fixed batch", cycled[name] / fixed[name],
                                  CYCLING_VS_FIXED))
    return out


def exits_table(results: dict) -> list[str]:
    lines = ["| shape | cut (FLOPs before) | original GFLOPs | profile | rows leaving (fresh random rows) "
             "| FLOPs reduction | threshold |", "|---|---|---|---|---|---|---|"]
    for shape, r in _shapes(results).items():
        for profile, threshold in r["thresholds"].items():
            realized = next((v for k, v in r["realized"].items() if k.startswith(profile + "/")), None)
            left = "-" if realized is None else f"{realized['exit_fraction']:.1%}"
            saved = "-" if realized is None else f"{realized['flops_reduction']:.1%}"
            lines.append(f"| {SHAPE_NAMES.get(shape, shape)} | `{r['cut']}` ({r['fraction_before']:.1%}) "
                         f"| {r['original_mflops'] / 1e3:.3g} | {profile} | {left} | {saved} | {threshold:.3f} |")
    return lines


def latency_table(results: dict) -> list[str]:
    lines = ["| shape | batch | original ms | CUDA-Graph original ms | profile / layout | compiled ms "
             "| compiled / original | target: <= 1 - 0.8 x FLOPs reduction |", "|---|---|---|---|---|---|---|---|"]
    for shape, r in _shapes(results).items():
        for batch, t in r["latency_ms"].items():
            graph = f"{t[CUDA_GRAPH]:.3f}" if CUDA_GRAPH in t else "-"
            for profile, layout in _compiled(t):
                name = f"{profile}/{layout}"
                ratio = t[name] / t[ORIGINAL]
                realized, bound = r["realized"].get(name), "-"
                if realized is not None and profile != "closed":
                    limit = 1 - FLOPS_SHARE * realized["flops_reduction"]
                    bound = f"{limit:.3f} ({'met' if ratio <= limit else 'missed'})"
                lines.append(f"| {SHAPE_NAMES.get(shape, shape)} | {batch} | {t[ORIGINAL]:.3f} | {graph} | {name} "
                             f"| {t[name]:.3f} | {ratio:.3f} | {bound} |")
    return lines


def cycling_table(results: dict) -> list[str]:
    r = results.get("served_cycling")
    if not isinstance(r, dict) or not r.get("ms_per_call"):
        return []
    labels = list(r["ms_per_call"])
    names = list(r["ms_per_call"][labels[0]])
    lines = ["| graph | " + " | ".join(f"{label} ms" for label in labels) + " | ratio |",
             "|---" * (len(labels) + 2) + "|"]
    for name in names:
        values = [r["ms_per_call"][label].get(name) for label in labels]
        ratio = f"{values[-1] / values[0]:.2f}" if None not in values else "-"
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + f" | {ratio} |")
    return lines


def errors(results: dict) -> list[str]:
    """One line per distinct failure of a served-shape step, naming the runners it hit."""
    seen: dict[str, list[str]] = {}
    for key, value in results.items():
        if not key.startswith("served_") or not isinstance(value, dict):
            continue
        found = value.get("errors", {"step": value["error"]} if "error" in value else {})
        for name, message in found.items():
            seen.setdefault(message.strip().splitlines()[-1][:300], []).append(f"{key[7:]}: {name}")
    return [f"- not measured ({', '.join(names[:6])}{' ...' if len(names) > 6 else ''}): `{message}`"
            for message, names in seen.items()]


def render(results: dict) -> str:
    """The subsection's text (starting with its ``### Served shapes:`` line)."""
    env = results.get("environment", {})
    small = any(r.get("small") for r in _shapes(results).values())
    checked = targets(results)
    lines = [f"### {SUBSECTION}: early exits on a ResNet-50 and a BERT-base encoder"
             + (" (DRY RUN at small widths, not GPU figures)" if small else ""), "",
             f"Machine: {env.get('gpu', '?')}; onnxruntime {env.get('onnxruntime', '?')}. Random weights from a "
             "seed (`benchmarks/served_shapes.py`: latency depends on shapes), one exit about a third of the way "
             "through the FLOPs, thresholds set on random rows so that 30%, 50% or 70% of rows leave; `closed`: "
             "threshold +inf (rules run, no row leaves). A systems curve, not certified plans: the trained "
             "references with their certified plans are the rows above. Layouts: `nested` (If per exit), "
             "`bucketed` (continuing rows padded to batch buckets), `staged` (moco's stage runner over the "
             "bucketed graph, CUDA Graphs per stage and bucket). Latency: host arrays in and out, sessions "
             "alternating in one process, TF32 off, no cuDNN search; the CUDA-Graph original is bound to fixed "
             "buffers (`enable_cuda_graph`), its rows copied in and out per call.", "",
             *exits_table(results), "", *latency_table(results), ""]
    if table := cycling_table(results):
        lines += ["Reference CNN with its certified plan, ms per call, batch sizes fixed at their mean or cycling "
                  "29/37/41/53 (ratio: cycling / fixed):", "", *table, ""]
    if checked:
        lines += ["Targets (issue 26):", ""] + [f"- {t.what}: {t.value:.3f} (target <= {t.bound:.3f}): "
                                                f"{'met' if t.met else 'missed'}" for t in checked] + [""]
    lines += errors(results)
    return "\n".join(lines).strip()
