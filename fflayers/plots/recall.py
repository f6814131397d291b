"""Figures of dissecting factual recall (seed 001): attention knockout, attribute extraction, subject
enrichment and sublayer knockout (:mod:`fflayers.recall`)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from fflayers.plots.figures import axes_figure, layer_axis

__all__ = ["plot_knockout_curves", "plot_extraction_rates", "plot_attributes_rate", "plot_sublayer_knockout"]


#: legend labels and line styles of the knockout position sets (the paper's "subject", "non-subject", "last")
_KNOCKOUT_STYLE = {
    "subject": ("subject", "-", "o"),
    "non_subject": ("non-subject", "--", "s"),
    "last": ("last", ":", "^"),
    "first": ("first", "-.", "v"),
    "non_subject_excl_first": ("non-subject (w/o first)", (0, (5, 1, 1, 1)), "D"),
}


def plot_knockout_curves(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Attention knockout (columns ``set, layer, window_start, window_end, rel_change_pct``): the mean
    relative change (%) of the predicted token's probability against the layer the blocking window is centred
    on, one line per position set, as in the paper's information-flow figure."""
    fig, ax = axes_figure()
    order = ([s for s in _KNOCKOUT_STYLE if s in set(table["set"])]
             + sorted(set(table["set"]) - set(_KNOCKOUT_STYLE)))
    for name in order:
        mean = table[table["set"] == name].groupby("layer")["rel_change_pct"].mean()
        label, style, marker = _KNOCKOUT_STYLE.get(name, (name, "-", "x"))
        ax.plot(mean.index, mean.values, linestyle=style, marker=marker, markersize=3, label=label)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    layers = sorted(set(table["layer"]))
    layer_axis(ax, layers[:: max(1, -(-len(layers) // 16))])
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


def plot_extraction_rates(events: pd.DataFrame, title: str | None = None, top_k: int = 10) -> Figure:
    """Attribute extraction (an events table of :func:`fflayers.recall.extraction.extraction_events`): per
    layer the % of facts whose MHSA (resp. MLP) output at the last position has the attribute as top-1
    (left) and within its ``top_k`` tokens (right), one colour per sublayer and one line style per variant.
    When no top-1 event occurs at all, the left panel says so."""
    from fflayers.recall.extraction import extraction_rates

    fig = Figure(figsize=(10.0, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2, sharex=True)
    colours = {"attn": "C0", "mlp": "C1"}
    names = {"attn": "MHSA", "mlp": "MLP"}
    rates = extraction_rates(events, top_k) if len(events) else None
    for variant in list(dict.fromkeys(events["variant"])):
        suffix, style = _EXTRACTION_STYLE.get(variant, (f", {variant}", "-"))
        for sublayer in ("attn", "mlp"):
            part = rates[(rates["variant"] == variant) & (rates["sublayer"] == sublayer)]
            for ax, column in ((left, "rate"), (right, "topk_rate")):
                ax.plot(part["layer"], 100 * part[column], linestyle=style, marker="o", markersize=2.5,
                        color=colours[sublayer], label=names[sublayer] + suffix)
    layers = sorted(set(events["layer"]))
    n = events["known_id"].nunique() if len(events) else 0
    for ax, what in ((left, "attribute = top-1"), (right, f"attribute in the top {top_k}")):
        layer_axis(ax, layers[:: max(1, -(-len(layers) // 12))])
        ax.set_ylabel(f"% of facts, {what}")
        ax.set_ylim(bottom=0, top=max(5.0, ax.get_ylim()[1]))
    if n and not events["event"].any():
        left.text(0.5, 0.5, f"no top-1 extraction event\nin any layer ({n} facts)", ha="center", va="center",
                  transform=left.transAxes, fontsize=9, color="0.3")
    left.legend(fontsize=7)
    fig.suptitle(title or f"Attribute extraction at the last position ({n} facts)")
    return fig


def plot_attributes_rate(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Subject enrichment (a table of :func:`fflayers.recall.enrichment.attributes_rate`): the mean
    attributes rate (%) of the hidden state per layer, one line per position, with the input-embedding
    baseline dashed."""
    fig, ax = axes_figure()
    ok = table.dropna(subset=["rate"])
    for i, (position, part) in enumerate(ok.groupby("position", sort=False)):
        hidden = part[part["source"] != "embedding"].groupby("layer")["rate"].mean()
        ax.plot(hidden.index, 100 * hidden.values, marker="o", markersize=3, color=f"C{i}", label=position)
        base = part[part["source"] == "embedding"]["rate"]
        if len(base):
            ax.axhline(100 * base.mean(), color=f"C{i}", linestyle="--", linewidth=1,
                       label=f"{position}: subject embedding")
    layers = sorted(set(ok.loc[ok["source"] != "embedding", "layer"]))
    layer_axis(ax, layers[:: max(1, -(-len(layers) // 16))])
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
            ax.plot(mean.index, scale * mean.values, marker="o", markersize=3, color=f"C{i}",
                    label=names[kind])
        none = values[values["kind"] == "none"][column]
        if len(none):
            ax.axhline(scale * none.mean(), color="grey", linestyle="--", linewidth=1, label="no knockout")
        starts = sorted(set(values.loc[values["kind"] != "none", "start"]))
        layer_axis(ax, starts[:: max(1, -(-len(starts) // 12))])
        ax.set_xlabel("first knocked-out layer")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    width = int((table["end"] - table["start"]).max()) + 1 if len(table) else 0
    fig.suptitle(title or f"Sublayer knockout (windows of up to {width} layers; measured at layer "
                          f"{layer + 1})")
    return fig
