"""Render ``benchmarks/gpu_check.py``'s JSON as the section "GPU (CUDA)" of ``benchmarks/RESULTS.md``: the
reference models' steps as the section's text, the served shapes' (``gpu_served_report.py``) as its
subsection "Served shapes"."""
from __future__ import annotations

import re

from benchmarks import gpu_served_report, results as results_file
from benchmarks.results import write_subsections

SECTION = "GPU (CUDA)"
MIB = 2 ** 20
VARIANTS = ("heuristic", "no_search", "no_tf32")  # session variants gpu_check times beside the defaults


def _ok(results: dict, name: str) -> dict | None:
    value = results.get(name)
    return value if isinstance(value, dict) and "error" not in value else None


def parity_table(results: dict) -> list[str]:
    lines = ["| graph | rows | rows whose exit differs | full-network rows | max relative difference | class differs |",
             "|---|---|---|---|---|---|"]
    for name, label in (("parity_original", "CNN original"), ("parity_compiled", "CNN compiled"),
                        ("parity_compiled_no_tf32", "CNN compiled, `use_tf32=0`"),
                        ("text_parity_compiled", "MiniLM-6 compiled"),
                        ("text_parity_compiled_no_tf32", "MiniLM-6 compiled, `use_tf32=0`")):
        if (p := _ok(results, name)) is not None:
            lines.append(f"| {label} | {p['rows']:,} | {p.get('exit_mismatches', '-')} | {p.get('full_rows', p['rows']):,} "
                         f"| {p['max_relative_difference']:.1e} | {p['class_mismatches']} |")
    return lines


def latency_table(results: dict) -> list[str]:
    lines = ["| model | batch | original ms | compiled ms | compiled / original | FLOPs ratio (same rows) "
             "| realized / FLOPs reduction | compiled / original, cuDNN heuristic search | no cuDNN search "
             "| TF32 off |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model, latency, accuracy in (("CNN", "latency", "accuracy"), ("MiniLM-6", "text_latency", "text_accuracy")):
        timings, stats = _ok(results, latency), _ok(results, accuracy)
        if timings is None:
            continue
        reduction = stats["compiled"].get("compute_reduction") if stats else None
        for batch, t in timings.items():
            ratio = t["compiled"] / t["original"]
            flops = "-" if reduction is None else f"{1 - reduction:.3f}"
            realized = "-" if not reduction else f"{(1 - ratio) / reduction:.2f}"
            searches = [f"{t[f'compiled_{s}'] / t[f'original_{s}']:.3f} ({t[f'compiled_{s}']:.3f} ms)"
                        if f"compiled_{s}" in t else "-" for s in VARIANTS]
            lines.append(f"| {model} | {batch} | {t['original']:.3f} | {t['compiled']:.3f} | {ratio:.3f} | {flops} "
                         f"| {realized} | {' | '.join(searches)} |")
    return lines


def no_exit_table(results: dict) -> list[str]:
    lines = ["| net | exits | batch | original ms | one exit ms | every cut ms | per exit ms | overhead, every cut |",
             "|---|---|---|---|---|---|---|---|"]
    for net, label in (("no_exit_cnn", "16/32/64 (reference)"), ("no_exit_wide", "64/128/256")):
        if (r := _ok(results, net)) is None:
            continue
        for batch, t in r["latency"].items():
            per_exit = (t["closed_all"] - t["plain"]) / r["exits"]
            lines.append(f"| {label} | {r['exits']} | {batch} | {t['plain']:.3f} | {t['closed_one']:.3f} "
                         f"| {t['closed_all']:.3f} | {per_exit:.3f} | {100 * (t['closed_all'] / t['plain'] - 1):+.1f}% |")
    return lines


def conv_shapes_table(results: dict) -> list[str]:
    if (r := _ok(results, "conv_batch_shapes")) is None:
        return []
    lines = ["| batch sizes, cuDNN search | ms per batch |", "|---|---|"]
    return lines + [f"| {name} | {ms:.3f} |" for name, ms in r.items()]


def fewer_exits_table(results: dict) -> list[str]:
    if (r := _ok(results, "text_fewer_exits")) is None:
        return []
    names = list(next(iter(r.values())))
    lines = ["| batch | " + " | ".join(f"{n} ms" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for batch, t in r.items():
        lines.append(f"| {batch} | " + " | ".join(f"{t[n]:.3f} ({t[n] / t['original']:.2f}x)" for n in names) + " |")
    if (stats := _ok(results, "text_accuracy")) is not None and "max2" in stats:
        m = stats["max2"]
        lines += ["", f"`max2` is certified on its own (`moco compile --max-exits 2`, 1% budget): on the test rows "
                      f"on CUDA, {1 - m['exit_rates'].get('-1', 0):.1%} of rows exit, compute reduction "
                      f"{m['compute_reduction']:.1%}, disagreement {m['disagreement']:.2%}, accuracy "
                      f"{m['accuracy']:.2%} (original {stats['original']['accuracy']:.2%}). `topk` keep the default "
                      "plan's k busiest exits, not re-certified."]
    return lines


def float16_table(results: dict) -> list[str]:
    lines = ["| model | fp16 / fp32 latency b=1 | b=64 | GPU memory after load fp32 / fp16 (MiB) "
             "| after batch 64 fp32 / fp16 (MiB) | accuracy fp32 / fp16 | fp16 disagreement |",
             "|---|---|---|---|---|---|---|"]
    for model, prefix, accuracy in (("CNN", "", "accuracy"), ("MiniLM-6", "text_", "text_accuracy")):
        timings, memory, stats = (_ok(results, f"{prefix}float16_latency"), _ok(results, f"{prefix}float16_memory"),
                                  _ok(results, accuracy))
        if timings is None:
            continue
        ratios = [f"{t['float16'] / t['float32']:.2f}x" for t in timings.values()]
        mem = ("- | -" if memory is None else
               f"{memory['float32']['load_bytes'] / MIB:.0f} / {memory['float16']['load_bytes'] / MIB:.0f} | "
               f"{memory['float32']['peak_bytes'] / MIB:.0f} / {memory['float16']['peak_bytes'] / MIB:.0f}")
        acc = ("- | -" if stats is None else f"{stats['original']['accuracy']:.2%} / {stats['float16']['accuracy']:.2%} | "
               f"{stats['float16']['disagreement']:.2%}")
        lines.append(f"| {model} | {ratios[0]} | {ratios[1]} | {mem} | {acc} |")
    return lines


def notes(results: dict) -> list[str]:
    out = []
    if (t := _ok(results, "tensorrt")) is not None:
        out.append(f"- TensorRT EP: listed by onnxruntime: {t['available']}; libnvinfer on the machine: "
                   f"{t['libnvinfer'] or 'no'}; the compiled CNN's session runs on {t.get('runs_on', t.get('error'))}.")
    if (g := _ok(results, "cuda_graph")) is not None:
        for name, r in g.items():
            out.append(f"- CUDA Graph capture (`enable_cuda_graph=1`), {name} CNN: "
                       + ("accepted." if r["accepted"] else f"refused: `{r['error'].strip().splitlines()[-1][:300]}`"))
    if (e := _ok(results, "exit_session_threads")) is not None:
        out.append(f"- `ExitSession` on {e['provider']} (I/O binding {e['io_binding']}), {e['threads']} threads at "
                   f"once: outputs identical to one thread: {e['identical']}; statistics counted "
                   f"{e['statistics']['rows']:,} rows.")
    failed = [name for name, value in results.items() if isinstance(value, dict) and "error" in value]
    for name in failed:
        out.append(f"- step `{name}` failed: `{results[name]['error'].strip().splitlines()[-1][:300]}`")
    return out


READING = """What this shows:
- Parity: with TF32 (onnxruntime's CUDA default) some rows take another exit than in the float32 run
  that certified the plan; with TF32 off, exits are identical to the CPU's and full-network rows agree
  to float32 rounding.  `ExitSession` turns TF32 off on CUDA (`cuda_options` to override).
- Every exit costs a device-to-host sync per batch (the If condition is read on the host), about
  0.15-0.17 ms on this machine whatever the batch or width: on small networks that is more than the
  whole forward pass, so the no-exit overhead target (<= 5% on CUDA) is missed by far.
- Convolutions: the rows continuing past an exit change every Conv's batch size at every call, and
  onnxruntime's CUDA Conv (cuDNN 9 frontend) re-plans on each change, even on the plain network when
  batch sizes alternate: exhaustive search makes the compiled CNN two orders of magnitude slower; no
  search (moco's CUDA default now) still an order.  Early exits do not pay for CNNs on onnxruntime-CUDA.
- Transformers (cuBLAS matrix products take any row count): with the 12 exits a CPU plan opens, the
  syncs dominate up to batch 256; with 1-3 exits (certified: `--max-exits 2`), the compiled graph is
  faster from batch 256, and every variant is at batch 1024.
- float16 on CUDA: same accuracy, less GPU memory for the text model, faster at batch 64; the tiny CNN
  gains nothing.  TensorRT: the EP is listed but the machine has no TensorRT libraries, so onnxruntime
  falls back to CUDA (not measured).  CUDA Graphs refuse graphs with If nodes."""


def render(results: dict, sources: list[str]) -> str:
    env = results["environment"]
    lines = ["Command: `bash benchmarks/gpu_check.sh` on a lent GPU machine, graphs from "
             "`python benchmarks/gpu_prepare.py` on the CPU machine, onnxruntime-gpu packed by "
             "`benchmarks/gpu_pack_onnxruntime.py`; this section by "
             f"`python benchmarks/gpu_check.py --record {' '.join(sources)}` (a later file's steps replace "
             "an earlier one's).", "",
             f"Machine: {env['gpu']}; onnxruntime-gpu {env['onnxruntime']} (CUDA execution provider), "
             f"Python {env['python']}. Latency: `session.run` with host arrays in and out (copies included), "
             "sessions alternating in one process, median of 5 rounds. Text batches padded to their longest row.", "",
             "Parity, CUDA vs CPU on the same rows (2,048 Fashion-MNIST test images; 2,000 Rotten Tomatoes test rows):",
             "", *parity_table(results), "", "Compiled (1% budget) vs original on the same GPU:", "",
             *latency_table(results), "",
             "Exits that never fire (thresholds +inf: rules and If boundaries run, no row leaves): what each exit's "
             "host sync costs on CUDA (the If condition is read on the host):", "", *no_exit_table(results), "",
             "The original CNN alone, batch size fixed or changing at every call (as the rows that continue past "
             "an exit do); onnxruntime logs `OP Conv(...) running in Fallback mode. May be extremely slow.` for "
             "the subgraph convolutions of the compiled graph:", "", *conv_shapes_table(results), "",
             "MiniLM-6 with fewer exits, ms per batch and ratio to the original:", "", *fewer_exits_table(results), "",
             "float16 (`moco optimize-memory --fp16`) on CUDA; GPU memory by NVML in a fresh process, after a "
             "warm-up session, default arena:", "", *float16_table(results), "", *notes(results), "", READING]
    return "\n".join(lines)


def _reference_steps(results: dict) -> bool:
    """Whether ``results`` holds any step of the reference models' groups (``cnn``, ``no_exit``, ``text``)."""
    return any(key != "environment" and not key.startswith("served_") and not key.endswith("_seconds")
               for key in results)


def _current_text() -> str:
    """The section's text before its first subsection, as RESULTS.md holds it now."""
    match = results_file._section_pattern(SECTION).search(results_file.RESULTS.read_text())
    return re.split(r"^### ", match.group(1), maxsplit=1, flags=re.M)[0] if match else ""


def record(results: dict, sources: list[str]) -> None:
    """Write the section from the ``gpu_check_*.json`` files (named in ``sources``) that ``gpu_check.py``
    wrote on the GPU machine: the reference models' text when they hold its steps (else the text is kept as
    it stands), the subsection "Served shapes" when they hold served-shape steps (else it is kept)."""
    text = render(results, sources) if _reference_steps(results) else _current_text()
    served = gpu_served_report.render(results) if any(key.startswith("served_") for key in results) else None
    print(text if served is None else served)
    write_subsections(SECTION, text, {} if served is None else {gpu_served_report.SUBSECTION: served})
