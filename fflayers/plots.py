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

Knowledge neurons (seed 003):

* :func:`plot_knowledge_neuron_effects`: per relation, the % change of the correct answer's probability when
  the refined neurons are suppressed / enhanced, on related and unrelated prompts, beside random neurons.

Dissecting factual recall (seed 001):

* :func:`plot_knockout_curves`: attention knockout, the mean relative change of the predicted token's
  probability per layer, one line per blocked position set;
* :func:`plot_extraction_rates`: attribute extraction rate per layer, MHSA vs MLP, per variant;
* :func:`plot_attributes_rate`: subject enrichment, attributes rate per layer against the embedding baseline;
* :func:`plot_sublayer_knockout`: attributes rate and attribute probability when MLP or MHSA sublayers of a
  window of layers are knocked out, per first knocked-out layer.
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
    "plot_knowledge_neuron_effects",
    "plot_knockout_curves",
    "plot_extraction_rates",
    "plot_attributes_rate",
    "plot_sublayer_knockout",
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


#: legend labels and line styles of the knockout position sets (the paper's "subject", "non-subject", "last")
_KNOCKOUT_STYLE = {
    "subject": ("subject", "-", "o"),
    "non_subject": ("non-subject", "--", "s"),
    "last": ("last", ":", "^"),
    "first": ("first", "-.", "v"),
    "non_subject_excl_first": ("non-subject (w/o first)", (0, (5, 1, 1, 1)), "D"),
}


def plot_knockout_curves(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Attention knockout (columns ``set, layer, window_start, window_end, rel_change_pct``): the mean relative
    change (%) of the predicted token's probability against the layer the blocking window is centred on, one
    line per position set, as in the paper's information-flow figure."""
    fig, ax = _figure()
    order = [s for s in _KNOCKOUT_STYLE if s in set(table["set"])] + sorted(set(table["set"]) - set(_KNOCKOUT_STYLE))
    for name in order:
        mean = table[table["set"] == name].groupby("layer")["rel_change_pct"].mean()
        label, style, marker = _KNOCKOUT_STYLE.get(name, (name, "-", "x"))
        ax.plot(mean.index, mean.values, linestyle=style, marker=marker, markersize=3, label=label)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    layers = sorted(set(table["layer"]))
    _layer_axis(ax, layers[:: max(1, -(-len(layers) // 16))])
    ax.set_ylabel("% change in prediction probability")
    width = int((table["window_end"] - table["window_start"]).max()) + 1 if len(table) else 0
    n_facts = table["known_id"].nunique() if "known_id" in table else 0
    ax.set_title(title or f"Attention knockout (window of up to {width} layers, {n_facts} facts)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


#: legend labels and line styles of the extraction variants
_EXTRACTION_STYLE = {
    "none": ("", "-"),
    "block_subject": (", subject blocked", "--"),
    "block_non_subject": (", non-subject blocked", "-."),
    "block_last": (", last blocked", ":"),
    "patch_subject": (", early subject patched", (0, (5, 1, 1, 1))),
}


def plot_extraction_rates(events: pd.DataFrame, title: str | None = None) -> Figure:
    """Attribute extraction (an events table of :func:`fflayers.recall.extraction.extraction_events`): per layer
    the % of facts whose MHSA (resp. MLP) output at the last position has the attribute as top-1, one colour
    per sublayer and one line style per variant."""
    fig, ax = _figure()
    colours = {"attn": "C0", "mlp": "C1"}
    names = {"attn": "MHSA", "mlp": "MLP"}
    variants = list(dict.fromkeys(events["variant"]))
    for variant in variants:
        part = events[events["variant"] == variant]
        suffix, style = _EXTRACTION_STYLE.get(variant, (f", {variant}", "-"))
        for sublayer in ("attn", "mlp"):
            rate = part[part["sublayer"] == sublayer].groupby("layer")["event"].mean()
            ax.plot(rate.index, 100 * rate.values, linestyle=style, marker="o", markersize=2.5,
                    color=colours[sublayer], label=names[sublayer] + suffix)
    layers = sorted(set(events["layer"]))
    _layer_axis(ax, layers[:: max(1, -(-len(layers) // 16))])
    ax.set_ylabel("extraction rate (% of facts)")
    ax.set_ylim(bottom=0)
    n = events["known_id"].nunique() if len(events) else 0
    ax.set_title(title or f"Attribute extraction at the last position ({n} facts)")
    ax.legend(fontsize=7)
    return fig


def plot_attributes_rate(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Subject enrichment (a table of :func:`fflayers.recall.enrichment.attributes_rate`): the mean attributes
    rate (%) of the hidden state per layer, one line per position, with the input-embedding baseline dashed."""
    fig, ax = _figure()
    ok = table.dropna(subset=["rate"])
    for i, (position, part) in enumerate(ok.groupby("position", sort=False)):
        hidden = part[part["source"] != "embedding"].groupby("layer")["rate"].mean()
        ax.plot(hidden.index, 100 * hidden.values, marker="o", markersize=3, color=f"C{i}", label=position)
        base = part[part["source"] == "embedding"]["rate"]
        if len(base):
            ax.axhline(100 * base.mean(), color=f"C{i}", linestyle="--", linewidth=1,
                       label=f"{position}: subject embedding")
    layers = sorted(set(ok.loc[ok["source"] != "embedding", "layer"]))
    _layer_axis(ax, layers[:: max(1, -(-len(layers) // 16))])
    ax.set_ylabel("attributes rate (%)")
    ax.set_ylim(bottom=0)
    n = ok["known_id"].nunique() if len(ok) else 0
    ax.set_title(title or f"Subject enrichment ({n} subjects with paragraphs)")
    ax.legend(fontsize=8)
    return fig


def plot_sublayer_knockout(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Sublayer knockout (a table of :func:`fflayers.recall.sublayer_knockout.sublayer_knockout`): the mean
    attributes rate (%, left) and attribute probability (right) against the first knocked-out layer, for MLP
    and MHSA knockouts, with the unedited model dashed; the deepest measured layer is shown."""
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    layer = int(table["layer"].max()) if len(table) else 0
    part = table[table["layer"] == layer]
    names = {"mlp": "MLP knocked out", "attn": "MHSA knocked out"}
    for ax, column, scale, label in ((left, "rate", 100, "attributes rate (%)"),
                                     (right, "attribute_prob", 1, "attribute probability")):
        values = part.dropna(subset=[column])
        for i, kind in enumerate(k for k in ("mlp", "attn") if k in set(values["kind"])):
            mean = values[values["kind"] == kind].groupby("start")[column].mean()
            ax.plot(mean.index, scale * mean.values, marker="o", markersize=3, color=f"C{i}", label=names[kind])
        none = values[values["kind"] == "none"][column]
        if len(none):
            ax.axhline(scale * none.mean(), color="grey", linestyle="--", linewidth=1, label="no knockout")
        starts = sorted(set(values.loc[values["kind"] != "none", "start"]))
        _layer_axis(ax, starts[:: max(1, -(-len(starts) // 12))])
        ax.set_xlabel("first knocked-out layer")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    width = int((table["end"] - table["start"]).max()) + 1 if len(table) else 0
    fig.suptitle(title or f"Sublayer knockout (windows of up to {width} layers; measured at layer {layer + 1})")
    return fig


def plot_submodule_r2(table: pd.DataFrame, title: str | None = None) -> Figure:
    """r^2 of each submodule's linear map (solid) and of the identity (dashed) per layer."""
    fig, ax = _figure()
    for i, (name, group) in enumerate(table.groupby("submodule", sort=False)):
        color = f"C{i % 10}"
        for mapping, style in (("mat", "-"), ("id", "--")):
            g = group[group["mapping"] == mapping].sort_values("layer")
            ax.plot(g["layer"], g["r2"].clip(lower=-1), linestyle=style, marker="o", markersize=3, color=color,
                    label=f"{name} ({mapping})")
    ax.set_xlabel("layer")
    ax.set_ylabel("r$^2$ (clipped at -1)")
    ax.set_ylim(-1.05, 1.02)
    ax.set_title(title or "Linear maps of submodules")
    ax.legend(fontsize=7, ncol=2)
    return fig


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
