"""Render ``benchmarks/gpu_check.py``'s JSON as the section "GPU (CUDA)" of ``benchmarks/RESULTS.md``."""
from __future__ import annotations

from benchmarks.results import write_section

SECTION = "GPU (CUDA)"
MIB = 2 ** 20


def _ok(results: dict, name: str) -> dict | None:
    value = results.get(name)
    return value if isinstance(value, dict) and "error" not in value else None


def parity_table(results: dict) -> list[str]:
    lines = ["| graph | rows | rows whose exit differs | full-network rows | max relative difference | class differs |",
             "|---|---|---|---|---|---|"]
    for name, label in (("parity_original", "CNN original"), ("parity_compiled", "CNN compiled"),
                        ("parity_compiled_no_tf32", "CNN compiled, `use_tf32=0`"),
                        ("text_parity_compiled", "MiniLM-6 compiled")):
        if (p := _ok(results, name)) is not None:
            lines.append(f"| {label} | {p['rows']:,} | {p.get('exit_mismatches', '-')} | {p.get('full_rows', p['rows']):,} "
                         f"| {p['max_relative_difference']:.1e} | {p['class_mismatches']} |")
    return lines


def latency_table(results: dict) -> list[str]:
    lines = ["| model | batch | original ms | compiled ms | compiled / original | FLOPs ratio (same rows) "
             "| realized / FLOPs reduction |", "|---|---|---|---|---|---|---|"]
    for model, latency, accuracy in (("CNN", "latency", "accuracy"), ("MiniLM-6", "text_latency", "text_accuracy")):
        timings, stats = _ok(results, latency), _ok(results, accuracy)
        if timings is None:
            continue
        reduction = stats["compiled"].get("compute_reduction") if stats else None
        for batch, t in timings.items():
            ratio = t["compiled"] / t["original"]
            flops = "-" if reduction is None else f"{1 - reduction:.3f}"
            realized = "-" if not reduction else f"{(1 - ratio) / reduction:.2f}"
            lines.append(f"| {model} | {batch} | {t['original']:.3f} | {t['compiled']:.3f} | {ratio:.3f} | {flops} "
                         f"| {realized} |")
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


def render(results: dict) -> str:
    env = results["environment"]
    lines = ["Command: `bash benchmarks/gpu_check.sh` on a lent GPU machine, graphs from "
             "`python benchmarks/gpu_prepare.py` on the CPU machine; this section by "
             "`python benchmarks/gpu_check.py --record gpu_check_*.json`.", "",
             f"Machine: {env['gpu']}; onnxruntime-gpu {env['onnxruntime']} (CUDA execution provider), "
             f"Python {env['python']}. Latency: `session.run` with host arrays in and out (copies included), "
             "sessions alternating in one process, median of 5 rounds. Text batches padded to their longest row.", "",
             "Parity, CUDA vs CPU on the same rows (2,048 Fashion-MNIST test images; 2,000 Rotten Tomatoes test rows):",
             "", *parity_table(results), "", "Compiled (1% budget) vs original on the same GPU:", "",
             *latency_table(results), "",
             "Exits that never fire (thresholds +inf: rules and If boundaries run, no row leaves): what each exit's "
             "host sync costs on CUDA (the If condition is read on the host):", "", *no_exit_table(results), "",
             "float16 (`moco optimize-memory --fp16`) on CUDA; GPU memory by NVML in a fresh process, after a "
             "warm-up session, default arena:", "", *float16_table(results), "", *notes(results)]
    return "\n".join(lines)


def record(results: dict) -> None:
    """Write the section from a ``gpu_check.json`` that ``gpu_check.py`` wrote on the GPU machine."""
    text = render(results)
    print(text)
    write_section(SECTION, text)
