"""Figures of parameters in embedding space (seed 004): token maps and hidden states against their most
active values (:mod:`fflayers.embedding_space`)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from fflayers.plots.figures import axes_figure, layer_axis

__all__ = ["plot_token_map", "plot_neurons_vs_hidden"]


def plot_token_map(table: pd.DataFrame, title: str, max_labels: int = 60) -> Figure:
    """Scatter of a token map (columns ``x, y, token, score, rank``); the best ``max_labels`` are labelled."""
    fig, ax = axes_figure(7.0, 6.0)
    points = ax.scatter(table["x"], table["y"], c=table["score"], cmap="viridis", s=14)
    for row in table.sort_values("rank").head(max_labels).itertuples(index=False):
        ax.annotate(repr(row.token)[1:-1], (row.x, row.y), fontsize=7, xytext=(2, 2),
                    textcoords="offset points")
    fig.colorbar(points, ax=ax, label="score")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(title)
    return fig


def plot_neurons_vs_hidden(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """Per layer: share of the hidden state's top-k tokens found among its most active values' top-k tokens,
    and the same for random values (columns ``layer, overlap_active, overlap_random``)."""
    fig, ax = axes_figure()
    ax.plot(summary["layer"], 100 * summary["overlap_active"], marker="o", label="most active values")
    ax.plot(summary["layer"], 100 * summary["overlap_random"], marker="s", linestyle="--",
            label="random values")
    layer_axis(ax, summary["layer"])
    ax.set_ylabel("hidden-state top-k tokens found (%)")
    ax.set_title(title or "Hidden state vs its most active values, in embedding space")
    ax.legend()
    return fig
