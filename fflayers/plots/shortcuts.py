"""Figures of the linear shortcuts between layers (seed 002): r^2 heatmaps, precision and surprisal, early
exit and submodule maps (:mod:`fflayers.shortcuts`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fflayers.plots.figures import axes_figure

__all__ = ["plot_r2_heatmap", "plot_shortcut_precision", "plot_early_exit", "plot_submodule_r2"]


def plot_r2_heatmap(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Heatmaps of r^2 (columns ``i, j, mapping, r2``): one panel per mapping, source state i (rows) to
    target state j (columns), the lower triangle empty, as in the paper."""
    mappings = [m for m in ("mat", "id") if m in set(table["mapping"])]
    n = int(max(table["i"].max(), table["j"].max())) + 1
    fig = Figure(figsize=(4.2 * len(mappings) + 0.8, 4.0), layout="constrained")
    axes = fig.subplots(1, len(mappings), squeeze=False)[0]
    image = None
    for ax, mapping in zip(axes, mappings, strict=True):
        grid = np.full((n, n), np.nan)
        for row in table[table["mapping"] == mapping].itertuples(index=False):
            grid[int(row.i), int(row.j)] = row.r2
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
        ax.set_title(mapping)
        ax.set_xlabel("target state j")
        ax.set_ylabel("source state i")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="$r^2$")
    fig.suptitle(title or "$r^2$ of linear shortcuts between layers")
    return fig


def plot_shortcut_precision(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Per source layer: precision@k of each mapping (left) and the surprisal of its top-1 (right)."""
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    ks = [c for c in table.columns if c.startswith("precision@")]
    styles = ["-", "--", ":"]
    for mapping, group in table.groupby("mapping", sort=False):
        group = group.sort_values("layer")
        for k, style in zip(ks, styles, strict=False):
            left.plot(group["layer"], group[k], linestyle=style, marker="o", markersize=3,
                      label=f"{mapping} {k}")
        right.plot(group["layer"], group["surprisal"], marker="o", markersize=3, label=mapping)
    left.set_xlabel("source layer i")
    left.set_ylabel("precision")
    left.set_ylim(0, 1.02)
    left.legend(fontsize=7)
    right.set_xlabel("source layer i")
    right.set_ylabel("surprisal of the shortcut's top-1 (bits)")
    right.legend()
    fig.suptitle(title or "Shortcuts to the output: agreement with the model")
    return fig


def plot_early_exit(table: pd.DataFrame, title: str | None = None) -> Figure:
    """precision@1 against the mean number of layers saved, one curve per mapping over the lambda grid."""
    fig, ax = axes_figure()
    for mapping, group in table.groupby("mapping", sort=False):
        group = group.sort_values("layers_saved")
        ax.plot(group["layers_saved"], group["precision@1"], marker="o", markersize=3, label=mapping)
    ax.set_xlabel("layers saved (mean)")
    ax.set_ylabel("precision@1")
    ax.set_title(title or "Early exit")
    ax.legend()
    return fig


def plot_submodule_r2(table: pd.DataFrame, title: str | None = None) -> Figure:
    """r^2 of each submodule's linear map (solid) and of the identity (dashed) per layer."""
    fig, ax = axes_figure()
    for i, (name, group) in enumerate(table.groupby("submodule", sort=False)):
        color = f"C{i % 10}"
        for mapping, style in (("mat", "-"), ("id", "--")):
            g = group[group["mapping"] == mapping].sort_values("layer")
            ax.plot(g["layer"], g["r2"].clip(lower=-1), linestyle=style, marker="o", markersize=3,
                    color=color, label=f"{name} ({mapping})")
    ax.set_xlabel("layer")
    ax.set_ylabel("r$^2$ (clipped at -1)")
    ax.set_ylim(-1.05, 1.02)
    ax.set_title(title or "Linear maps of submodules")
    ax.legend(fontsize=7, ncol=2)
    return fig
