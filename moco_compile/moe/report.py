"""The HTML page of ``moco moe bench``: per-layer hit rates of each predictor and TPOT per policy."""
from __future__ import annotations

import html
from typing import Any

from moco_compile.reports.html import cell_html, figure_html, page_html, percent_text, table_html

OPTIMUM_PREFIX = "offline optimum"


def layer_labels(num_layers: int) -> list[str]:
    """The layer each source layer's next-layer prediction targets: ``layer 1..L-1``, then the next token's 0."""
    return [f"layer {layer}" for layer in range(1, num_layers)] + ["next token, layer 0"]


def _hit_rate_figure(hit_rates: dict[str, list[float]]) -> str:
    def draw(figure) -> None:
        axes = figure.subplots()
        labels = layer_labels(len(next(iter(hit_rates.values()))))
        for name, rates in hit_rates.items():
            axes.plot(range(len(labels)), [100 * r for r in rates], marker="o", label=name)
        axes.set_xticks(range(len(labels)), labels)
        axes.set_xlabel("predicted layer (from the layer before it)")
        axes.set_ylabel("hit rate, recall@k (%)")
        axes.set_ylim(0, 100)
        axes.legend()

    return figure_html("hit-rate", "Hit rate per layer", "Share of the experts each layer used that the "
                       "predictor named, on held-out text.", draw)


def _tpot_figure(rows: list[dict]) -> str:
    optimum = min(row["tpot_ms"] for row in rows if row["policy"].startswith(OPTIMUM_PREFIX))
    shown = [row for row in rows if not row["policy"].startswith(OPTIMUM_PREFIX)][::-1]

    def draw(figure) -> None:
        axes = figure.subplots()
        axes.barh([row["policy"] for row in shown], [row["tpot_ms"] for row in shown])
        axes.axvline(optimum, color="black", linestyle="--", label=f"offline optimum ({optimum:.3g} ms)")
        axes.set_xlabel("time per output token (ms, simulated)")
        axes.legend(loc="lower right")

    return figure_html("tpot", "TPOT per policy", "Simulated time per output token of greedy decoding "
                       "(compute measured on this machine, transfers at the stated link); the dashed line is the "
                       "offline optimum (Belady's cache, knowing the true routing).", draw)


def bench_page(hit_rates: dict[str, list[float]], flops: dict[str, float], rows: list[dict],
               settings: dict[str, Any]) -> str:
    """The page: settings, the hit-rate table and plot, the TPOT table and plot."""
    hit_rows = [f"<tr><th>{html.escape(name)}</th>"
                + "".join(cell_html(percent_text(rate), rate) for rate in rates)
                + cell_html(f"{flops[name]:,.0f}", flops[name]) + "</tr>" for name, rates in hit_rates.items()]
    tpot_rows = [f"<tr><th>{html.escape(row['policy'])}</th>"
                 + cell_html(format(row["tpot_ms"], ".3f"), row["tpot_ms"])
                 + "".join(cell_html(percent_text(row[key]), row[key])
                           for key in ("hit_rate", "reduction_vs_on_demand", "reduction_vs_lru", "gap_closed"))
                 + "</tr>" for row in rows]
    settings_rows = [f"<tr><th>{html.escape(key)}</th>{cell_html(str(value), value)}</tr>"
                     for key, value in settings.items()]
    body = ["<h1>moco moe bench</h1>",
            table_html("settings", "Settings", ["setting", "value"], settings_rows),
            "<h2>Predictors</h2>",
            table_html("hit-rates", "Hit rate (recall@k) of the next layer on held-out text, and FLOPs per "
                       "token and layer", ["predictor", *layer_labels(len(next(iter(hit_rates.values())))),
                                           "FLOPs"], hit_rows),
            _hit_rate_figure(hit_rates),
            "<h2>Time per output token</h2>",
            table_html("tpot", "Simulated TPOT per policy", ["policy", "TPOT (ms)", "cache hit rate", "vs on-demand",
                                                             "vs LRU", "of the gap LRU -> optimum"], tpot_rows),
            _tpot_figure(rows)]
    notes = ["TPOT is simulated: compute durations measured on this machine, transfers at the stated link "
             "bandwidth and expert size, one link serving loads in order; not a measurement on an accelerator.",
             "The offline optimum knows the true routing (Belady: evict the expert needed furthest in the future; "
             "the better of demand loads only and prefetching the true experts); each policy's gain over LRU "
             "reads as a share of the optimum's.",
             "Hit rates are measured on held-out windows of the trace, the TPOT on greedy decoding of the prompts."]
    return page_html("moco moe bench", body, notes)
