"""Demo step 7: linear shortcuts between layers, through ``analysis/linear_shortcuts.py all`` (fit, r2,
evaluate, early exit in one process) and ``submodules``, then a summary read back from their tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fflayers.assets import minilm_path


def _adjacent_r2(out: Path) -> str:
    r2 = pd.read_csv(out / "r2.tsv", sep="\t")
    adj = r2[r2["j"] == r2["i"] + 1].pivot(index="i", columns="mapping", values="r2")
    def fmt(x: float) -> str:  # a coordinate that is (almost) constant makes r^2 of id hugely negative
        return f"{x:.2f}" if x > -10 else "<-10"

    return "  ".join(f"{i}->{i + 1}: mat {fmt(row['mat'])} / id {fmt(row['id'])}"
                     for i, row in adj.iterrows())


def run_shortcuts(out: Path, corpus: Path, fairseq_dir: Path, smollm2_dir: Path) -> None:
    """The demo fairseq LM (all analyses and the submodule maps), SmolLM2 (a small sample: 200 positions for
    d = 576, so a ridge) and MiniLM (r2: an encoder without an MLM head)."""
    from memories_demo import _run  # examples/demo is on sys.path when run_demo.py runs

    runs = {
        "fairseq demo LM": (out / "fairseq", ["--model_dir", str(fairseq_dir), "--train_sentences", "2000",
                                              "--val_sentences", "300"]),
        "SmolLM2-135M": (out / "smollm2", ["--hf_model", str(smollm2_dir), "--train_sentences", "200",
                                           "--val_sentences", "60", "--ridge", "0.01", "--lambdas",
                                           "0.2", "0.6"]),
        "MiniLM (BERT, masked)": (out / "minilm", ["--hf_model", str(minilm_path()),
                                                   "--train_sentences", "1000", "--val_sentences", "200",
                                                   "--ridge", "0.01"]),
    }
    for folder, flags in runs.values():
        if not (folder / "r2.tsv").is_file():
            out.mkdir(parents=True, exist_ok=True)
            _run("linear_shortcuts.py", "all", *flags, "--data_file", str(corpus), "--output_dir",
                 str(folder), "--quiet")
    fairseq_out = runs["fairseq demo LM"][0]
    if not (fairseq_out / "submodule_evaluate.tsv").is_file():
        _run("linear_shortcuts.py", "submodules", "--model_dir", str(fairseq_dir), "--output_dir",
             str(fairseq_out), "--eval_positions", "100", "--quiet")
    for name, (folder, _) in runs.items():
        print(f"\n{name}: r^2 of adjacent-layer maps vs the identity (validation positions)")
        print("  " + _adjacent_r2(folder))
    ev = pd.read_csv(runs["fairseq demo LM"][0] / "evaluate.tsv", sep="\t")
    p1 = ev.pivot(index="layer", columns="mapping", values="precision@1")
    print("\nfairseq demo LM: precision@1 of shortcuts from layer i to the output (mat: A_{L,i}; id: "
          "read x_i directly)")
    print("  layer: " + " ".join(f"{i:>6d}" for i in p1.index))
    print("  mat:   " + " ".join(f"{x:6.3f}" for x in p1["mat"]))
    print("  id:    " + " ".join(f"{x:6.3f}" for x in p1["id"]))
    ee = pd.read_csv(runs["fairseq demo LM"][0] / "early_exit.tsv", sep="\t")
    print("fairseq demo LM: early exit (lambda: layers saved / precision@1)")
    for mapping, g in ee.groupby("mapping"):
        print(f"  {mapping}: " + "  ".join(f"{r['lambda']:.1f}: {r.layers_saved:.2f}/{r['precision@1']:.2f}"
                                          for _, r in g.iloc[::2].iterrows()))
    sm = (pd.read_csv(runs["SmolLM2-135M"][0] / "evaluate.tsv", sep="\t")
          .pivot(index="layer", columns="mapping", values="precision@1"))
    print("SmolLM2-135M: precision@1 of shortcuts to the output, every third layer (200 training positions)")
    print("  layer: " + " ".join(f"{i:>5d}" for i in sm.index[::3]))
    print("  mat:   " + " ".join(f"{x:5.2f}" for x in sm["mat"].iloc[::3]))
    print("  id:    " + " ".join(f"{x:5.2f}" for x in sm["id"].iloc[::3]))
    sub = (pd.read_csv(fairseq_out / "submodule_evaluate.tsv", sep="\t")
           .pivot(index="layer", columns="mapping", values="precision@1"))
    print(
        "fairseq demo LM: precision@1 with one kind of submodule replaced by its linear map in blocks l..L-1")
    print("  layer  " + " ".join(f"{m:>11s}" for m in sub.columns))
    for layer, row in sub.iterrows():
        print(f"  {layer:5d}  " + " ".join(f"{x:11.3f}" for x in row))
    print(f"figures and tables in {out}/")
