"""analysis/plot_memories.py: figures are real PNG/PDF files and the per-layer summaries hold the numbers
counted by hand from small tables; bad inputs exit 2 with one line and write nothing."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import plot_memories as pm
from analysis.key_value_agreement import to_tsv_frame
from fflayers.backends.hf import HFAdapter
from fflayers.io import write_table
from fflayers.memories.ffn_info import extract_ffn_info
from fflayers.plots import plot_agreement, save_figure
from tests.fixtures.hf_models import tiny_model


def agreement_table(seed=0, n_layers=3, d_ff=20):
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(n_layers):
        for dim in range(d_ff):
            top1 = int(rng.integers(0, 50))
            targets = rng.integers(0, 50, size=int(rng.integers(0, 4))).tolist()
            if layer == 2 and dim < 5:
                targets = [top1, *targets]  # planted agreement with the top trigger in the last layer
            ranks = [0 if t == top1 else int(rng.integers(1, 50)) for t in targets]
            rows.append({"layer": layer, "W2_dim": dim, "max_prob": float(rng.random()),
                         "embedding_index": top1, "embedding_token": f"t{top1}",
                         "embedding_token_target_count": sum(t == top1 for t in targets),
                         "target_rankings": ranks})
    return pd.DataFrame(rows)


def layer_table():
    """Hand-made layer-mode rows: layer 0 -> 2 rows, layer 1 -> 2 rows."""
    df = pd.DataFrame({
        "sentence": [0, 0, 1, 1], "layer": [0, 1, 0, 1],
        "active_memories": [5, 10, 15, 20], "memories_agreeing": [0, 3, 1, 0],
        "top1_changed": [True, False, True, True], "residual_final_rank": [0, 0, 4, 0],
        "residual_norm_rank": [0, 2, 0, 0],
    })
    df.attrs["d_ff"] = 40
    return df


def magic_ok(path):
    data = path.read_bytes()
    return len(data) > 1000 and (data.startswith(b"\x89PNG") if path.suffix == ".png"
                                 else data.startswith(b"%PDF"))


def test_end_to_end(tmp_path, capsys):
    table, base = agreement_table(0), agreement_table(1)
    write_table(tmp_path / "kv.tsv", to_tsv_frame(table))
    write_table(tmp_path / "kv_random.tsv", to_tsv_frame(base))
    with open(tmp_path / "layer.pkl", "wb") as f:
        pickle.dump(layer_table(), f)
    dim = pd.DataFrame({"sentence": [0, 0], "layer": [0, 1],
                        "coefficients": [np.linspace(-1, 1, 8), np.ones(8)]})
    dim.to_pickle(tmp_path / "dim.pkl")
    out = tmp_path / "figs"
    rc = pm.main(["--agreement_tsv", str(tmp_path / "kv.tsv"),
                  "--baseline_tsv", str(tmp_path / "kv_random.tsv"),
                  "--ffn_info", str(tmp_path / "layer.pkl"), str(tmp_path / "dim.pkl"),
                  "--output_dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    for name in ("agreement_by_layer", "confident_values_by_layer", "active_memories_by_layer",
                 "top1_matches_by_layer", "coefficients_by_layer"):
        for ext in ("png", "pdf"):
            assert magic_ok(out / f"{name}.{ext}"), name
    summary = pd.read_csv(out / "agreement_by_layer.tsv", sep="\t").set_index("layer")
    for layer, g in table.groupby("layer"):
        has = g["target_rankings"].map(len) > 0
        any_match = (g["embedding_token_target_count"] > 0) & has
        top = g["target_rankings"].map(lambda r: bool(r) and r[0] == 0)
        assert summary.loc[layer, "with_triggers"] == has.sum()
        assert summary.loc[layer, "top1_in_targets"] == pytest.approx(any_match.sum() / has.sum())
        assert summary.loc[layer, "agreement_rate"] == pytest.approx(top.sum() / has.sum())
    assert summary.loc[2, "agreement_rate"] >= 5 / 20
    assert "agreement_rate_random" in summary.columns
    ffn = pd.read_csv(out / "ffn_layer_summary.tsv", sep="\t").set_index("layer")
    assert (ffn.loc[0, "active_share"] == pytest.approx(10 / 40)
            and ffn.loc[1, "active_share"] == pytest.approx(15 / 40))
    assert ffn.loc[0, "matches_memory"] == 0.5 and ffn.loc[1, "matches_memory"] == 0.5
    assert ffn.loc[1, "matches_residual"] == 0.5 and ffn.loc[0, "matches_neither"] == 0.5
    assert ffn.loc[0, "residual_is_final"] == 0.5 and ffn.loc[1, "residual_dominates"] == 0.5
    assert not list(out.glob(".*.tmp"))


def test_real_ffn_info_tables(tmp_path):
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    g = torch.Generator().manual_seed(0)
    sents = [torch.randint(1, 97, (12,), generator=g).tolist() for _ in range(5)]
    extract_ffn_info(adapter, sents, "layer", progress=False).to_pickle(tmp_path / "layer.pkl")
    extract_ffn_info(adapter, sents, "dim", dims=[1, 2, 3], progress=False).to_pickle(tmp_path / "dim.pkl")
    assert pm.main(["--ffn_info", str(tmp_path / "layer.pkl"), str(tmp_path / "dim.pkl"), "--output_dir",
                    str(tmp_path / "o"), "--formats", "png"]) == 0
    assert magic_ok(tmp_path / "o" / "coefficients_by_layer.png")
    assert magic_ok(tmp_path / "o" / "top1_matches_by_layer.png")
    assert not (tmp_path / "o" / "top1_matches_by_layer.pdf").exists()


def test_save_figure_atomic(tmp_path):
    from fflayers.memories.agreement import agreement_by_layer

    fig = plot_agreement(agreement_by_layer(agreement_table()))
    paths = save_figure(fig, tmp_path / "fig")
    assert [p.name for p in paths] == ["fig.png", "fig.pdf"] and all(magic_ok(p) for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png"]


@pytest.mark.parametrize("case", ["nothing", "missing", "not a table", "baseline alone",
                                  "output under a file", "dim as tsv"])
def test_bad_input(case, tmp_path, capsys):
    write_table(tmp_path / "kv.tsv", to_tsv_frame(agreement_table()))
    (tmp_path / "junk.tsv").write_text("a\tb\n1\t2\n")
    (tmp_path / "file").write_text("x")
    (tmp_path / "dim.tsv").write_text("layer\tcoefficients\n0\t[1, 2]\n")
    out = str(tmp_path / "o")
    argv = {
        "nothing": ["--output_dir", out],
        "missing": ["--agreement_tsv", str(tmp_path / "nope.tsv"), "--output_dir", out],
        "not a table": ["--agreement_tsv", str(tmp_path / "junk.tsv"), "--output_dir", out],
        "baseline alone": ["--baseline_tsv", str(tmp_path / "kv.tsv"), "--ffn_info", str(tmp_path / "kv.tsv"),
                           "--output_dir", out],
        "output under a file": ["--agreement_tsv", str(tmp_path / "kv.tsv"), "--output_dir",
                                str(tmp_path / "file" / "o")],
        "dim as tsv": ["--ffn_info", str(tmp_path / "dim.tsv"), "--output_dir", out],
    }[case]
    before = set(tmp_path.rglob("*"))
    capsys.readouterr()
    assert pm.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("plot_memories.py: error:")
    assert set(tmp_path.rglob("*")) == before
