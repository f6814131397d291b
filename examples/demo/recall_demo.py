"""Demo step: dissecting factual recall on SmolLM2 with country -> capital facts: the facts the model gets
right, attention knockout over all layers (figure + table), and a printed summary of where blocking the
subject hurts.

Runs in one process with one model load (the command line does the same with
``analysis/dissect_recall.py facts ... --countries --filter`` then ``knockout ... --facts``).
"""

from __future__ import annotations

import time
from pathlib import Path

from fflayers.assets import load_smollm2
from fflayers.io import run_metadata, write_json, write_table
from fflayers.plots import plot_knockout_curves, save_figure
from fflayers.recall import (
    KNOCKOUT_SETS,
    attention_knockout,
    countries_facts,
    encode_facts,
    filter_facts,
    save_facts,
)

#: countries read (in file order) to find N_FACTS known ones: SmolLM2 gets about one capital in four right
N_COUNTRIES = 40
N_FACTS = 6


def _summary(table) -> None:
    mean = table.pivot_table(index="layer", columns="set", values="rel_change_pct", aggfunc="mean")
    worst = mean["subject"].nsmallest(5)
    print("  mean relative change of the predicted token's probability (%) when blocking last -> set, "
          "per layer:")
    print("  layer " + " ".join(f"{s[:22]:>23s}" for s in mean.columns))
    for layer, row in mean.iterrows():
        print(f"  {layer:5d} " + " ".join(f"{x:23.1f}" for x in row))
    print("  blocking the subject hurts most at layers (window centre, 0-based): "
          + ", ".join(f"{layer} ({v:.0f}%)" for layer, v in worst.items()))
    upper = mean.index >= mean.index.max() * 2 // 3
    print(f"  upper third of the layers: subject {mean['subject'][upper].mean():.1f}% vs non-subject (w/o "
          f"first) {mean['non_subject_excl_first'][upper].mean():.1f}% vs last "
          f"{mean['last'][upper].mean():.1f}%")


def _extraction_and_projection(adapter, known, out_dir: Path) -> None:
    """Attribute extraction events (model as it is, and with the last position's edges to the subject
    blocked), figure and overview; the vocabulary projections of one fact at the last position, layer by
    layer."""
    from fflayers.plots import plot_extraction_rates
    from fflayers.recall import extraction_events, extraction_overview, vocabulary_projections

    events = extraction_events(adapter, known, variants=["none", "block_subject"], batch_size=64)
    write_table(out_dir / "extraction.parquet", events)
    save_figure(plot_extraction_rates(events, title="Attribute extraction, SmolLM2-135M (country capitals)"),
                out_dir / "extraction")
    normed = extraction_events(adapter, known, variants=["none"], final_norm=True, batch_size=64)
    write_table(out_dir / "extraction_final_norm.parquet", normed)
    save_figure(plot_extraction_rates(normed, title="Attribute extraction through the final norm, "
                                      "SmolLM2-135M"), out_dir / "extraction_final_norm")
    print("  attribute extraction (attribute = top-1 of the sublayer output at the last position; share of "
          "facts with the attribute in the sublayer's top 10 in some layer beside it):")
    for label, table in (("raw h E^T", events), ("final norm", normed)):
        for row in extraction_overview(table, top_k=10).itertuples(index=False):
            print(f"    {label:10s} {row.variant:14s} MHSA events {row.attn_events:3d} "
                  f"({100 * row.attn_any:3.0f}% of facts; top 10: {100 * row.attn_topk_any:3.0f}%), "
                  f"MLP events {row.mlp_events:3d} ({100 * row.mlp_any:3.0f}%; top 10: "
                  f"{100 * row.mlp_topk_any:3.0f}%)")
        if not table.loc[table.variant == "none", "event"].any():
            print(f"    {label}: no top-1 extraction event in any layer for these {len(known)} facts; the "
                  "top-10 shares show where the attribute surfaces")
    near = events[(events.variant == "none") & (events.attribute_rank < 10)]
    best = near.groupby(["sublayer", "layer"]).size().sort_values(ascending=False).head(3)
    print("    raw projection, attribute in the top 10 most often at: "
          + ", ".join(f"{'MHSA' if s == 'attn' else 'MLP'} layer {layer} ({n} of {len(known)} facts)"
                      for (s, layer), n in best.items()))
    import pandas as pd

    fact = known[0]  # hidden states through the final norm (the logit lens), sublayer outputs without it
    table = pd.concat([vocabulary_projections(adapter, [fact], points=["resid_post"], k=5, final_norm=True),
                       vocabulary_projections(adapter, [fact], points=["attn_out", "mlp_out"], k=5,
                                              final_norm=False)],
                      ignore_index=True)
    write_table(out_dir / "projection_one_fact.tsv", table)
    top1 = table[table["rank"] == 1].pivot_table(index="layer", columns="point", values="token",
                                                 aggfunc="first")
    print(f"  top-1 token at the last position of {fact.fact.prompt!r} (-> {fact.fact.attribute!r}):")
    print("  layer  " + "".join(f"{p:>18s}" for p in ("resid_post (norm)", "attn_out", "mlp_out")))
    for layer, row in top1.iloc[-10:].iterrows():
        print(f"  {layer:5d}  " + "".join(f"{row[p]!r:>18.18}"
                                          for p in ("resid_post", "attn_out", "mlp_out")))


def run_recall(out_dir: Path, adapter=None) -> None:
    """SmolLM2 (``adapter``, loaded when None): known country -> capital facts, attention knockout of all five
    position sets in every layer (window 9), figure and table in ``out_dir``, printed summary."""
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = load_smollm2() if adapter is None else adapter
    print(f"\n--- dissecting factual recall: SmolLM2-135M ({adapter.n_layers} layers), "
          "country -> capital facts")
    encoded, skipped = encode_facts(adapter, countries_facts()[:N_COUNTRIES])
    known = filter_facts(adapter, encoded)
    print(f"  {len(known)} of {len(encoded)} countries' capitals predicted correctly"
          f" ({len(skipped)} skipped); using {min(N_FACTS, len(known))}")
    known = known[:N_FACTS]
    save_facts([e.fact for e in known], out_dir / "known_capitals.json")
    table = attention_knockout(adapter, known, sets=KNOCKOUT_SETS, window=9, batch_size=128)
    write_table(out_dir / "knockout.parquet", table)
    write_json(out_dir / "knockout.parquet.meta.json",
               run_metadata({"model": "SmolLM2-135M-Instruct", "facts": len(known), "window": 9,
                             "sets": list(KNOCKOUT_SETS)}))
    save_figure(plot_knockout_curves(table, title="Attention knockout, SmolLM2-135M (country capitals)"),
                out_dir / "knockout")
    _summary(table)
    _extraction_and_projection(adapter, known, out_dir)
    print(f"  figures and tables in {out_dir}/ ({time.time() - t0:.0f} s)")
