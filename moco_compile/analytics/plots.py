"""Matplotlib figures of the analytics (object API, no pyplot), written atomically as PNG."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moco_compile.analytics.results import AnalyticsError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pad2(x: np.ndarray) -> np.ndarray:
    """Projections need two features; pad a one-feature embedding with zeros."""
    return x if x.shape[1] >= 2 else np.concatenate([x, np.zeros_like(x)], axis=1)


def new_figure() -> tuple["Figure", Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'moco-compile[analytics]'") from error
    figure = Figure(figsize=(8, 5.5), dpi=100)
    return figure, figure.add_subplot()


def class_colours(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20" if count <= 20 else "hsv"]
    return [cmap(i % cmap.N) if count <= 20 else cmap(i / count) for i in range(count)]


def save_png(figure: "Figure", path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG at ``path`` via a temporary name, so no partial file is left."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise AnalyticsError(f"cannot write the plot to {path}: {path.parent} is not a directory")
    FigureCanvasAgg(figure)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
