"""The figures of a shortcuts run folder, drawn from its tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["draw_figures"]


def draw_figures(out: Path) -> list[Path]:
    """The figures (PNG + PDF) of every table in ``out`` (r2, evaluate, early_exit, submodule_r2,
    submodule_evaluate); returns the files written."""
    from fflayers.io import read_table
    from fflayers.plots import (
        plot_early_exit,
        plot_r2_heatmap,
        plot_shortcut_precision,
        plot_submodule_r2,
        save_figure,
    )

    written: list[Path] = []
    for name, plot in (("r2", plot_r2_heatmap), ("evaluate", plot_shortcut_precision),
                       ("early_exit", plot_early_exit), ("submodule_r2", plot_submodule_r2),
                       ("submodule_evaluate", _plot_submodule_evaluate)):
        path = out / f"{name}.tsv"
        if path.is_file():
            written += save_figure(plot(read_table(path)), out / name)
    return written


def _plot_submodule_evaluate(table: pd.DataFrame) -> Figure:
    from fflayers.plots import plot_shortcut_precision

    return plot_shortcut_precision(table[["layer", "mapping", "precision@1", "surprisal"]],
                                   title="Shortcuts with one kind of submodule replaced by its linear map")
