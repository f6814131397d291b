"""Matplotlib figures of the analyses, saved atomically as PNG and PDF.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot, no global backend change), so
they render headless (Agg) and never open windows. Each ``plot_*`` function takes result tables and returns a
Figure; :func:`save_figure` writes it.

Key-value memories (seed 000):

* :func:`plot_agreement`: per layer, the share of values whose top-1 token is the target of at least one of
  their key's trigger examples, and the paper's agreement rate (top-1 = the top trigger example's target),
  with the same for random vectors as a baseline;
* :func:`plot_confident_values`: in which layers the most confident values (largest ``max_prob``) are;
* :func:`plot_active_memories`: share (or number) of active memories per layer;
* :func:`plot_top1_matches`: how often the layer's top-1 equals some memory's top-1, the residual's top-1,
  or neither;
* :func:`plot_coefficients`: distribution of the scaled coefficients ``m_i ||v_i||`` per layer.

Parameters in embedding space (seed 004):

* :func:`plot_token_map`: a 2-D (t-SNE) map of a vector's top tokens, labelled, coloured by score;
* :func:`plot_neurons_vs_hidden`: per layer, the overlap of the hidden state's top tokens with those of its
  most active values, beside random values.

Linear shortcuts (seed 002):

* :func:`plot_r2_heatmap`: r^2 of ``mat`` and ``id`` for every pair of states (i, j), side by side;
* :func:`plot_shortcut_precision`: precision@k and surprisal per layer for each mapping;
* :func:`plot_early_exit`: precision@1 against the layers saved, over the lambda grid, per mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fflayers.io import atomic_write

__all__ = [
    "save_figure",
    "plot_agreement",
    "plot_confident_values",
    "plot_active_memories",
    "plot_top1_matches",
    "plot_coefficients",
    "plot_token_map",
    "plot_neurons_vs_hidden",
    "plot_r2_heatmap",
    "plot_shortcut_precision",
    "plot_early_exit",
]


def save_figure(fig: Figure, path_base: str | Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 150) -> list[Path]:
    """Write ``{path_base}.{fmt}`` for each format (atomically); returns the paths."""
    out = []
    for fmt in formats:
        path = Path(f"{path_base}.{fmt}")
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight")
        out.append(path)
    return out


def _figure(width: float = 6.0, height: float = 3.6):
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _layer_axis(ax, layers) -> None:
    layers = list(layers)
    ax.set_xlabel("layer")
    ax.set_xticks(layers)
    ax.set_xticklabels([str(x + 1) for x in layers])  # 1-based, as in the paper


def plot_agreement(summary: pd.DataFrame, baseline: pd.DataFrame | None = None, title: str | None = None) -> Figure:
    """Agreement per layer, in percent, from :func:`fflayers.memories.agreement.agreement_by_layer` tables
    (``baseline``: the same for random values)."""
    fig, ax = _figure()
    x = summary["layer"].to_numpy()
    ax.plot(x, 100 * summary["top1_in_targets"], "o-", label="top-1 in trigger targets")
    ax.plot(x, 100 * summary["agreement_rate"], "s-", label="agreement rate (top trigger)")
    if baseline is not None and len(baseline):
        bx = baseline["layer"].to_numpy()
        ax.plot(bx, 100 * baseline["top1_in_targets"], "o--", color="0.5", label="random values: in targets")
        ax.plot(bx, 100 * baseline["agreement_rate"], "s:", color="0.5", label="random values: agreement rate")
    _layer_axis(ax, x)
    ax.set_ylabel("% of values")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title(title or "Key-value agreement")
    return fig


def plot_confident_values(table: pd.DataFrame, n: int = 100, n_layers: int | None = None) -> Figure:
    """Layers of the ``n`` values with the largest ``max_prob`` (an agreement table)."""
    fig, ax = _figure()
    top = table.nlargest(min(n, len(table)), "max_prob")
    last = int(table["layer"].max()) + 1 if n_layers is None else n_layers
    layers = np.arange(last)
    counts = top["layer"].value_counts().reindex(layers, fill_value=0)
    ax.bar(layers, counts.to_numpy())
    _layer_axis(ax, layers)
    ax.set_ylabel(f"values among the top {len(top)}")
    ax.set_title(f"Layers of the {len(top)} most confident values")
    return fig


def plot_active_memories(table: pd.DataFrame, d_ff: int | None = None) -> Figure:
    """Distribution over sentences of the active memories per layer (share of ``d_ff`` when known)."""
    d_ff = d_ff or table.attrs.get("d_ff")
    fig, ax = _figure()
    groups = [(int(layer), g["active_memories"].to_numpy(dtype=float)) for layer, g in table.groupby("layer", sort=True)]
    scale = 100.0 / d_ff if d_ff else 1.0
    ax.boxplot([vals * scale for _, vals in groups], positions=[layer for layer, _ in groups], widths=0.6,
               showfliers=False)
    _layer_axis(ax, [layer for layer, _ in groups])
    ax.set_ylabel("% of memories active" if d_ff else "active memories")
    ax.set_title("Active memories (m_i > 0) per layer")
    return fig


def plot_top1_matches(summary: pd.DataFrame) -> Figure:
    """From :func:`fflayers.memories.ffn_info.ffn_info_by_layer`: how often the layer's top-1 equals some
    memory's top-1, the residual's, or neither (percent of examples)."""
    fig, ax = _figure()
    x = summary["layer"].to_numpy()
    ax.plot(x, 100 * summary["matches_memory"], "o-", label="= top-1 of some memory")
    ax.plot(x, 100 * summary["matches_residual"], "s-", label="= top-1 of the residual")
    ax.plot(x, 100 * summary["matches_neither"], "^-", label="neither (composition)")
    _layer_axis(ax, x)
    ax.set_ylabel("% of examples")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Layer output's top-1 prediction")
    return fig


def plot_coefficients(table: pd.DataFrame, max_per_layer: int = 200_000, seed: int = 0) -> Figure:
    """Per layer, the distribution of the scaled coefficients ``m_i ||v_i||`` (a dim-mode table; at most
    ``max_per_layer`` values per layer, sampled): boxes with whiskers at the 1st and 99th percentiles."""
    rng = np.random.default_rng(seed)
    fig, ax = _figure()
    data, layers = [], []
    for layer, g in table.groupby("layer", sort=True):
        vals = np.concatenate([np.asarray(c, dtype=float).reshape(-1) for c in g["coefficients"]])
        if len(vals) > max_per_layer:
            vals = rng.choice(vals, max_per_layer, replace=False)
        data.append(vals)
        layers.append(int(layer))
    ax.boxplot(data, positions=layers, widths=0.6, whis=(1, 99), showfliers=False)
    ax.axhline(0, color="0.7", lw=0.8)
    _layer_axis(ax, layers)
    ax.set_ylabel("m_i ||v_i||")
    ax.set_title("Scaled memory coefficients")
    return fig


def plot_token_map(table: pd.DataFrame, title: str, max_labels: int = 60) -> Figure:
    """Scatter of a token map (columns ``x, y, token, score, rank``); the best ``max_labels`` are labelled."""
    fig, ax = _figure(7.0, 6.0)
    points = ax.scatter(table["x"], table["y"], c=table["score"], cmap="viridis", s=14)
    for row in table.sort_values("rank").head(max_labels).itertuples(index=False):
        ax.annotate(repr(row.token)[1:-1], (row.x, row.y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    fig.colorbar(points, ax=ax, label="score")
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(title)
    return fig


def plot_neurons_vs_hidden(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """Per layer: share of the hidden state's top-k tokens found among its most active values' top-k tokens,
    and the same for random values (columns ``layer, overlap_active, overlap_random``)."""
    fig, ax = _figure()
    ax.plot(summary["layer"], 100 * summary["overlap_active"], marker="o", label="most active values")
    ax.plot(summary["layer"], 100 * summary["overlap_random"], marker="s", linestyle="--", label="random values")
    _layer_axis(ax, summary["layer"])
    ax.set_ylabel("hidden-state top-k tokens found (%)")
    ax.set_title(title or "Hidden state vs its most active values, in embedding space")
    ax.legend()
    return fig


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
            left.plot(group["layer"], group[k], linestyle=style, marker="o", markersize=3, label=f"{mapping} {k}")
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
    fig, ax = _figure()
    for mapping, group in table.groupby("mapping", sort=False):
        group = group.sort_values("layers_saved")
        ax.plot(group["layers_saved"], group["precision@1"], marker="o", markersize=3, label=mapping)
    ax.set_xlabel("layers saved (mean)")
    ax.set_ylabel("precision@1")
    ax.set_title(title or "Early exit")
    ax.legend()
    return fig
