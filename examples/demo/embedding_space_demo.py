"""Demo step 6: parameters in embedding space, through ``analysis/embedding_space.py`` as a user would run it,
then tables read back from its outputs. Small selections here; the command line defaults to full runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fflayers.assets import minilm_path


def _show(title: str, table: pd.DataFrame, columns: list[str], rows: int = 10) -> None:
    print(f"\n{title}")
    shown = table[columns].head(rows).copy()
    for col in shown.columns:
        if shown[col].dtype == object:
            shown[col] = [repr(x)[1:-1] for x in shown[col]]
    with pd.option_context("display.width", 160, "display.max_colwidth", 30):
        print(shown.to_string(index=False))


def concept_value(export: pd.DataFrame, candidates: int = 200) -> tuple[int, int]:
    """Among the most confident values, the one whose top tokens are fewest distinct words (case and spaces
    ignored, mostly alphabetic tokens required): a value that writes one concept (' up', 'Up', 'UP', ...)."""
    top = export[export["rank"] == 0].nlargest(candidates, "score")
    keys = set(zip(top.layer, top.neuron, strict=True))
    rows = export[[key in keys for key in zip(export.layer, export.neuron, strict=True)]]
    def n_words(tokens) -> int:  # distinct words; values writing mostly non-words rank last
        words = [x.strip().lower() for x in tokens if x.strip().isalpha()]
        return len(set(words)) if len(words) >= 0.8 * len(tokens) else 10**6

    distinct = rows.groupby(["layer", "neuron"]).token.agg(n_words)
    best = min(keys, key=lambda key: (distinct[key], -float(top.set_index(["layer", "neuron"]).score[key])))
    return int(best[0]), int(best[1])


def run_embedding_space(out: Path, corpus: Path, smollm2_dir: Path) -> None:
    """Head pairs, the values export, a t-SNE map and neurons vs hidden on SmolLM2 (its dequantised copy in
    ``smollm2_dir``); keys and values on MiniLM."""
    from memories_demo import _run  # examples/demo is on sys.path when run_demo.py runs

    out.mkdir(parents=True, exist_ok=True)
    smol = ["--hf_model", str(smollm2_dir), "--quiet"]
    minilm = ["--hf_model", str(minilm_path()), "--quiet"]

    heads = out / "smollm2_heads_ov.tsv"
    if not heads.is_file():
        _run("embedding_space.py", "heads", *smol, "--layers", "20", "--heads", "0", "5", "--kind", "ov",
             "--n", "20", "--ascii_only", "--alnum_only", "--exclude_same", "--exclude_case_variants",
             "--output_file", str(heads))
    values = out / "smollm2_values.parquet"
    if not values.is_file():
        _run("embedding_space.py", "export", *smol, "--k", "10", "--output_file", str(values))
    layer, neuron = concept_value(pd.read_parquet(values))
    tsne = out / f"tsne_L{layer}_N{neuron}_value.png"
    if not tsne.is_file():
        _run("embedding_space.py", "tsne", *smol, "--layers", str(layer), "--neuron", str(neuron), "--k",
             "80", "--output_dir", str(out))
    nvh = out / "smollm2_neurons_vs_hidden.csv"
    if not nvh.is_file():
        _run("embedding_space.py", "neurons-vs-hidden", *smol, "--data_file", str(corpus), "--max_sentences",
             "40", "--k", "10", "--n_neurons", "10", "--output_file", str(nvh), "--figure",
             str(out / "smollm2_neurons_vs_hidden"))
    minilm_values = out / "minilm_values.tsv"
    if not minilm_values.is_file():
        _run("embedding_space.py", "values", *minilm, "--layers", "5", "--neurons", "0", "1", "2", "--k", "8",
             "--output_file", str(minilm_values))
    minilm_keys = out / "minilm_keys.tsv"
    if not minilm_keys.is_file():
        _run("embedding_space.py", "keys", *minilm, "--layers", "5", "--neurons", "0", "1", "2", "--k", "8",
             "--output_file", str(minilm_keys))

    table = pd.read_csv(heads, sep="\t", keep_default_na=False)
    for head, group in table.groupby("head"):
        _show(f"SmolLM2 layer 20, head {head} (key/value head {group.kv_head.iloc[0]}): top W_VO token pairs "
              "(token read -> token written)", group, ["rank", "row_token", "col_token", "score"], rows=12)
    export = pd.read_parquet(values)
    best = export[export["rank"] == 0].sort_values("score", ascending=False).head(8)
    print(f"\nSmolLM2 values exported: {len(export)} rows ({export.layer.nunique()} layers x "
          f"{export.neuron.nunique()} values x 10 tokens) in {values}")
    for row in best.itertuples(index=False):
        toks = export[(export.layer == row.layer) & (export.neuron == row.neuron)].sort_values("rank").token
        print(f"  value {row.neuron} of layer {row.layer}: {' | '.join(repr(t)[1:-1] for t in toks)}")
    summary = pd.read_csv(nvh)
    print(
        "\nSmolLM2: share of the hidden state's top-10 tokens among its 10 most active values' top-10 tokens")
    print("  layer: " + " ".join(f"{int(x) + 1:>5d}" for x in summary.layer))
    print("  active:" + " ".join(f"{100 * x:5.1f}" for x in summary.overlap_active))
    print("  random:" + " ".join(f"{100 * x:5.1f}" for x in summary.overlap_random))
    for name, path in (("values", minilm_values), ("keys", minilm_keys)):
        t = pd.read_csv(path, sep="\t", keep_default_na=False)
        for neuron, g in t.groupby("neuron"):
            print(f"MiniLM layer 5 {name[:-1]} {neuron} (input embedding): "
                  f"{' | '.join(repr(x)[1:-1] for x in g.sort_values('rank').token)}")
    print(f"\nfigures and tables in {out}/ (t-SNE map: {tsne.name} and .html)")
