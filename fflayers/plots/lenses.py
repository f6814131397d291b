"""Figures of the lens comparison (:mod:`fflayers.lenses`): one panel per metric, a line per lens."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

__all__ = ["METRIC_LABELS", "plot_lens_comparison"]

#: metric column -> axis label
METRIC_LABELS = {
    "kl_bits": "KL(final || lens), bits",
    "ce_bits": "cross-entropy, bits/token",
    "top1_agreement": "top-1 = final top-1",
    "precision_at_5": "final top-1 in lens top-5",
    "precision_at_10": "final top-1 in lens top-10",
    "surprisal_bits": "surprisal of final top-1, bits",
    "marginal_kl_bits": "marginal KL, bits",
}


def plot_lens_comparison(table: pd.DataFrame, title: str | None = None, log_kl: bool = True) -> Figure:
    """Per metric of :data:`METRIC_LABELS` found in ``table`` (columns ``lens, layer`` and the metrics), the
    metric against the state index, one line per lens; bits panels on a symlog scale when ``log_kl``."""
    metrics = [m for m in METRIC_LABELS if m in table.columns]
    cols = 4 if len(metrics) > 4 else len(metrics)
    rows = -(-len(metrics) // cols)
    fig = Figure(figsize=(3.4 * cols, 2.8 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax, metric in zip(axes, metrics, strict=False):
        for lens, part in table.groupby("lens", sort=False):
            part = part.sort_values("layer")
            ax.plot(part["layer"], part[metric], marker="o", markersize=3, label=str(lens))
        ax.set_xlabel("state (0 = embeddings)")
        ax.set_ylabel(METRIC_LABELS[metric], fontsize=8)
        if log_kl and metric.endswith("_bits"):  # zero at the last layer: linear near 0, log above
            ax.set_yscale("symlog", linthresh=0.1)
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig
