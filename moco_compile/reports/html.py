"""HTML building blocks of moco's pages: escaped cells and tables, embedded plots, one page.

Every page moco writes (build report, evaluation, memory, MoE) is built from these, so
escaping lives in one place and every page carries the generator ``<meta>`` that marks a
page moco wrote."""
from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from moco_compile.errors import MocoError
from moco_compile.outputs import PAGE_MARK


class ReportRenderError(MocoError):
    """A report cannot be drawn (the plotting library is missing); damaged build files are a BuildError."""


def figure_html(plot_id: str, title: str, caption: str, draw: Callable[[Any], None],
                size: tuple[float, float] = (7.0, 4.2)) -> str:
    """A ``<figure>`` holding ``draw(figure)``'s matplotlib figure as an embedded PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ReportRenderError("the HTML report needs matplotlib: pip install 'moco-compile[analytics]'") from error
    figure = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<figure id="figure-{plot_id}"><img class="plot" id="plot-{plot_id}" '
            f'data-plot="{html.escape(plot_id)}" alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{encoded}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def percent_text(value: Any, digits: int = 1) -> str:
    """``0.1234`` -> ``"12.3%"``; ``"-"`` for anything that is not a number."""
    return f"{100 * value:.{digits}f}%" if is_number(value) else "-"


def number_text(value: Any, spec: str = ".3g") -> str:
    """A value as table text: numbers by ``spec``, booleans as yes/no, None as ``"-"``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if is_number(value):
        return str(value) if isinstance(value, int) else format(value, spec)
    return "-" if value is None else str(value)


def _raw(value: Any) -> str | None:
    """``data-value`` text: JSON of a raw number, boolean or null (floats at full precision); none for text."""
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return None


def _attrs(**attributes: Any) -> str:
    parts = []
    for name, value in attributes.items():
        if value is None:
            continue
        parts.append(f' {name.rstrip("_").replace("_", "-")}="{html.escape(str(value), quote=True)}"')
    return "".join(parts)


def cell_html(text: str, value: Any = None, *, id_: str | None = None, class_: str | None = None,
              has_value: bool = True) -> str:
    """A ``<td>`` whose ``data-value`` holds the raw value (tools and tests read the page back)."""
    data = _raw(value) if has_value else None
    return f"<td{_attrs(id=id_, class_=class_, data_value=data)}>{html.escape(text)}</td>"


def table_html(table_id: str, caption: str, header: Sequence[str], rows: Sequence[str]) -> str:
    """A captioned table of ``rows`` (``<tr>`` strings) under ``header``."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    return (f'<table id="{table_id}"><caption>{html.escape(caption)}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def key_value_row(label: str, key: str, value: Any, text: str) -> str:
    """One ``label: text`` row whose cell has id ``key``."""
    return f'<tr data-key="{html.escape(key)}"><th>{html.escape(label)}</th>{cell_html(text, value, id_=key)}</tr>'


def page_html(title: str, body: Sequence[str], notes: Sequence[str] = ()) -> str:
    """A self-contained page moco wrote (its generator ``<meta>`` marks it): ``body`` then ``notes``."""
    body = list(body)
    if notes:
        items = "".join(f'<li class="note">{html.escape(note)}</li>' for note in notes)
        body += ["<h2>Notes</h2>", f'<ul id="notes">{items}</ul>']
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + PAGE_MARK
            + f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
td[data-value] { font-variant-numeric: tabular-nums; }
thead th { background: #f4f4f4; }
tr.full-row td { color: #666; }
dl#header { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; } dd { margin: 0; font-family: monospace; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; max-width: 800px; }
.missing, .note { color: #8a5a00; }
"""
