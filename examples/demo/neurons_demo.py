"""Demo step: knowledge neurons of SmolLM2-135M for a few country -> capital facts.

Integrated gradients over the last 6 of its 30 layers (3 steps, 2 paraphrases per fact), refined neurons
shared by both paraphrases, then the change of the capital's probability when they are suppressed or
enhanced: on the fact's own prompts, on a fact of another relation (the package's multi-relation fact file,
``fflayers/data/relations.jsonl``), and for as many random neurons of the same layers. Settings are small to
stay fast on a laptop CPU; analysis/knowledge_neurons.py runs the full search.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

CAPITALS = ("capital-france", "capital-germany", "capital-japan")


def run_neurons(out_dir: Path, adapter=None) -> None:
    """Find and test the knowledge neurons of SmolLM2 (``adapter``, loaded when None); tables, JSON summary
    and figure land in ``out_dir``."""
    from fflayers.assets import load_smollm2
    from fflayers.io import write_json, write_table
    from fflayers.neurons.evaluate import (
        SearchConfig,
        evaluate_facts,
        results_table,
        summarize,
        summary_table,
    )
    from fflayers.neurons.facts import load_relations
    from fflayers.plots import plot_knowledge_neuron_effects, save_figure

    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = load_smollm2() if adapter is None else adapter
    facts = [dataclasses.replace(f, prompts=f.prompts[:2]) for f in load_relations()]  # 2 paraphrases each
    wanted = [i for i, f in enumerate(facts) if f.uuid in CAPITALS]
    layers = tuple(range(adapter.n_layers - 6, adapter.n_layers))
    config = SearchConfig(steps=3, batch_size=len(layers) * 3, p=0.5, coarse_adaptive_threshold=0.3,
                          layers=layers)
    records = evaluate_facts(adapter, facts, config, indices=wanted)
    table = results_table(records)
    summary = summary_table(table)
    write_table(out_dir / "results.tsv", table)
    write_table(out_dir / "results_summary.tsv", summary)
    result = summarize(records)
    keys = ("uuid", "answer", "neurons", "unrelated_uuid", "unrelated_relation")
    write_json(out_dir / "results.json", {"summary": result, "config": config.to_json(),
                                          "facts": [{k: r[k] for k in keys} for r in records]})
    save_figure(plot_knowledge_neuron_effects(summary,
                                              "SmolLM2-135M: knowledge neurons of country -> capital"),
                out_dir / "knowledge_neurons")
    for r in records:
        shown = ", ".join(f"L{layer}.{i}" for layer, i in r["neurons"][:8]) + (
            " ..." if len(r["neurons"]) > 8 else "")
        print(f"  {r['uuid']} ({r['answer']}): {len(r['neurons'])} refined neurons: {shown or 'none'}; "
              f"other-relation fact: {r['unrelated_uuid']} ({r['unrelated_relation']})")
    s = result["capital"]
    print("  % change of the answer's probability (mean over facts):")
    for name in ("suppress", "enhance"):
        e = s[name]
        print(f"    {name:<8}  related {e.get('related', float('nan')):+7.1f}   other relation "
              f"{e.get('unrelated', float('nan')):+7.1f}   random neurons "
              f"{e.get('random_related', float('nan')):+7.1f}")
    print(f"  knowledge neurons done in {time.time() - start:.0f} s; outputs in {out_dir}/")


if __name__ == "__main__":
    import sys

    run_neurons(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/knowledge_neurons"))
