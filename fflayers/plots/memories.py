"""Figures of the key-value memory analyses (seed 000): agreement, confident values, active memories,
top-1 matches and coefficients (:mod:`fflayers.memories`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fflayers.plots.figures import axes_figure, layer_axis

__all__ = ["plot_agreement", "plot_confident_values", "plot_active_memories", "plot_top1_matches",
           "plot_coefficients"]


def plot_agreement(summary: pd.DataFrame, baseline: pd.DataFrame | None = None,
                   title: str | None = None) -> Figure:
    """Agreement per layer, in percent, from :func:`fflayers.memories.agreement.agreement_by_layer` tables
    (``baseline``: the same for random values)."""
    fig, ax = axes_figure()
    x = summary["layer"].to_numpy()
    ax.plot(x, 100 * summary["top1_in_targets"], "o-", label="top-1 in trigger targets")
    ax.plot(x, 100 * summary["agreement_rate"], "s-", label="agreement rate (top trigger)")
    if baseline is not None and len(baseline):
        bx = baseline["layer"].to_numpy()
        ax.plot(bx, 100 * baseline["top1_in_targets"], "o--", color="0.5", label="random values: in targets")
        ax.plot(bx, 100 * baseline["agreement_rate"], "s:", color="0.5",
                label="random values: agreement rate")
    layer_axis(ax, x)
    ax.set_ylabel("% of values")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title(title or "Key-value agreement")
    return fig


def plot_confident_values(table: pd.DataFrame, n: int = 100, n_layers: int | None = None) -> Figure:
    """Layers of the ``n`` values with the largest ``max_prob`` (an agreement table)."""
    fig, ax = axes_figure()
    top = table.nlargest(min(n, len(table)), "max_prob")
    last = int(table["layer"].max()) + 1 if n_layers is None else n_layers
    layers = np.arange(last)
    counts = top["layer"].value_counts().reindex(layers, fill_value=0)
    ax.bar(layers, counts.to_numpy())
    layer_axis(ax, layers)
    ax.set_ylabel(f"values among the top {len(top)}")
    ax.set_title(f"Layers of the {len(top)} most confident values")
    return fig


def plot_active_memories(table: pd.DataFrame, d_ff: int | None = None) -> Figure:
    """Distribution over sentences of the active memories per layer (share of ``d_ff`` when known)."""
    d_ff = d_ff or table.attrs.get("d_ff")
    fig, ax = axes_figure()
    groups = [(int(layer), g["active_memories"].to_numpy(dtype=float))
              for layer, g in table.groupby("layer", sort=True)]
    scale = 100.0 / d_ff if d_ff else 1.0
    ax.boxplot([vals * scale for _, vals in groups], positions=[layer for layer, _ in groups], widths=0.6,
               showfliers=False)
    layer_axis(ax, [layer for layer, _ in groups])
    ax.set_ylabel("% of memories active" if d_ff else "active memories")
    ax.set_title("Active memories (m_i > 0) per layer")
    return fig


def plot_top1_matches(summary: pd.DataFrame) -> Figure:
    """From :func:`fflayers.memories.ffn_info.ffn_info_by_layer`: how often the layer's top-1 equals some
    memory's top-1, the residual's, or neither (percent of examples)."""
    fig, ax = axes_figure()
    x = summary["layer"].to_numpy()
    ax.plot(x, 100 * summary["matches_memory"], "o-", label="= top-1 of some memory")
    ax.plot(x, 100 * summary["matches_residual"], "s-", label="= top-1 of the residual")
    ax.plot(x, 100 * summary["matches_neither"], "^-", label="neither (composition)")
    layer_axis(ax, x)
    ax.set_ylabel("% of examples")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Layer output's top-1 prediction")
    return fig


def plot_coefficients(table: pd.DataFrame, max_per_layer: int = 200_000, seed: int = 0) -> Figure:
    """Per layer, the distribution of the scaled coefficients ``m_i ||v_i||`` (a dim-mode table; at most
    ``max_per_layer`` values per layer, sampled): boxes with whiskers at the 1st and 99th percentiles."""
    rng = np.random.default_rng(seed)
    fig, ax = axes_figure()
    data, layers = [], []
    for layer, g in table.groupby("layer", sort=True):
        vals = np.concatenate([np.asarray(c, dtype=float).reshape(-1) for c in g["coefficients"]])
        if len(vals) > max_per_layer:
            vals = rng.choice(vals, max_per_layer, replace=False)
        data.append(vals)
        layers.append(int(layer))
    ax.boxplot(data, positions=layers, widths=0.6, whis=(1, 99), showfliers=False)
    ax.axhline(0, color="0.7", lw=0.8)
    layer_axis(ax, layers)
    ax.set_ylabel("m_i ||v_i||")
    ax.set_title("Scaled memory coefficients")
    return fig
