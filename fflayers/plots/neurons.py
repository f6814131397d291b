"""Figures of knowledge neurons (seed 003): the effect of suppressing or enhancing them on the correct
answer (:mod:`fflayers.neurons`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["plot_knowledge_neuron_effects"]


#: bar label and colour of each (prompt set, neuron set) of the knowledge-neuron evaluation
_KN_BARS = (("related", "refined", "related facts", "tab:blue"),
            ("unrelated", "refined", "unrelated facts", "tab:orange"),
            ("related", "random", "random neurons (related)", "0.6"))


def plot_knowledge_neuron_effects(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """Knowledge neurons (columns ``relation, intervention, prompts, neurons, change_pct`` of
    :func:`fflayers.neurons.evaluate.summary_table`): one panel per intervention (suppress, enhance), bars per
    relation for related prompts, unrelated prompts and random neurons, as in the paper's figures 3 and 4."""
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    interventions = [i for i in ("suppress", "enhance") if i in set(summary["intervention"])]
    axes = np.atleast_1d(fig.subplots(1, max(1, len(interventions))))
    relations = list(dict.fromkeys(summary["relation"]))
    width = 0.8 / len(_KN_BARS)
    for ax, intervention in zip(axes, interventions, strict=False):
        part = summary[summary["intervention"] == intervention]
        for j, (prompts, neurons, label, colour) in enumerate(_KN_BARS):
            rows = part[(part["prompts"] == prompts) & (part["neurons"] == neurons)].set_index("relation")
            values = [float(rows.loc[r, "change_pct"]) if r in rows.index else np.nan for r in relations]
            ax.bar(np.arange(len(relations)) + (j - 1) * width, values, width, label=label, color=colour)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(relations)))
        ax.set_xticklabels(relations, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("change of the correct answer's probability (%)")
        ax.set_title(f"{intervention.capitalize()} knowledge neurons")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "Knowledge neurons: effect on the correct answer")
    return fig
