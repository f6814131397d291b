"""Shared helpers of :mod:`fflayers.plots`: a figure with one set of axes, the layer axis, atomic saving.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot, no global backend change), so they
render headless (Agg) and never open windows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fflayers.io import atomic_write

__all__ = ["save_figure", "axes_figure", "layer_axis"]


def save_figure(fig: Figure, path_base: str | Path, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 150) -> list[Path]:
    """Write ``{path_base}.{fmt}`` for each format (atomically); returns the paths."""
    out = []
    for fmt in formats:
        path = Path(f"{path_base}.{fmt}")
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight")
        out.append(path)
    return out


def axes_figure(width: float = 6.0, height: float = 3.6) -> tuple[Figure, Axes]:
    """A new ``width x height`` inch figure (constrained layout) and its one set of axes."""
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def layer_axis(ax: Axes, layers: Iterable[int]) -> None:
    """Label the x axis "layer", one tick per layer in ``layers`` (0-based), shown 1-based as in the paper."""
    layers = list(layers)
    ax.set_xlabel("layer")
    ax.set_xticks(layers)
    ax.set_xticklabels([str(x + 1) for x in layers])  # 1-based, as in the paper
