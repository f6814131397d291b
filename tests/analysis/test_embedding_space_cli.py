"""analysis/embedding_space.py end to end on a tiny GPT-2 with the real BPE vocabulary; bad input exits 2
with one line and no output file."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import embedding_space as es

LINES = ["The river flows north through the old town.", "Paris is the capital of France.",
         "The team won the final game of the season."]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = es.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_values_heads_export(tiny_gpt2_dir, tmp_path, capsys):
    from fflayers.backends.hf import load_hf_lm

    model = ["--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet"]
    rc, out, err = run_cli(["values", *model, "--layers", 1, "--neurons", 3, "--k", 4], capsys)
    assert rc == 0, err
    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    E = adapter.model.lm_head.weight.detach()
    top = (adapter.model.transformer.h[1].mlp.c_proj.weight[3].detach() @ E.T).topk(4).indices.tolist()
    assert all(str(t) in out for t in top)

    corpus = tmp_path / "tokens.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    heads = tmp_path / "heads.tsv"
    rc, out, err = run_cli(["heads", *model, "--layers", 0, "--heads", 1, "--kind", "qk", "ov", "--n", 10,
                            "--exclude_same", "--token_list", corpus, "--output_file", heads], capsys)
    assert rc == 0, err
    table = pd.read_csv(heads, sep="\t", keep_default_na=False)
    assert len(table) == 20 and set(table.kind) == {"qk", "ov"}
    listed = {t for line in LINES for t in adapter.vocab.tokenize(line, add_bos=False)}
    assert set(table.row_token_id) <= listed and set(table.col_token_id) <= listed
    assert (table.row_token_id != table.col_token_id).all()
    meta = json.loads(Path(f"{heads}.meta.json").read_text())
    assert meta["config"]["embedding_kind"]

    export = tmp_path / "values.parquet"
    rc, out, err = run_cli(["export", *model, "--sides", "key", "value", "--k", 3, "--output_file",
                            export], capsys)
    assert rc == 0, err
    table = pd.read_parquet(export)
    assert len(table) == 2 * 2 * 32 * 3  # layers x sides x neurons x k
    row = table[(table.layer == 1) & (table.side == "value") & (table.neuron == 3)].sort_values("rank")
    assert row.token_id.tolist() == top[:3]


def test_tsne_and_neurons_vs_hidden(tiny_gpt2_dir, tmp_path, capsys):
    model = ["--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet"]
    rc, out, err = run_cli(["tsne", *model, "--layers", 1, "--neuron", 5, "--k", 30, "--output_dir",
                            tmp_path], capsys)
    assert rc == 0, err
    for ext in ("png", "pdf", "html", "tsv"):
        assert (tmp_path / f"tsne_L1_N5_value.{ext}").stat().st_size > 0
    html = (tmp_path / "tsne_L1_N5_value.html").read_text()
    assert "<script src=\"http" not in html and "Plotly" in html  # plotly.js embedded: opens offline

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(LINES) + "\n")
    out_file = tmp_path / "nvh.csv"
    rc, out, err = run_cli(["neurons-vs-hidden", *model, "--data_file", corpus, "--k", 5, "--n_neurons", 4,
                            "--output_file", out_file, "--figure", tmp_path / "nvh"], capsys)
    assert rc == 0, err
    table = pd.read_csv(out_file)
    assert table.layer.tolist() == [0, 1] and (table.positions == 3).all()
    assert (tmp_path / "nvh.png").is_file()


def _bad(model: Path, tmp: Path) -> dict[str, list]:
    no_vocab = tmp / "no_vocab.txt"  # written by the test: characters GPT-2 BPE maps to no whole token
    m = ["--hf_model", model, "--device", "cpu"]
    return {
        "layer out of range": ["values", *m, "--layers", 9],
        "neuron out of range": ["values", *m, "--layers", 0, "--neurons", 32],
        "head out of range": ["heads", *m, "--layers", 0, "--heads", 2],
        "N larger than V^2": ["heads", *m, "--layers", 0, "--heads", 0, "--n", 50257**2 + 1],
        "k = 0": ["values", *m, "--k", 0],
        "missing token list": ["heads", *m, "--token_list", tmp / "missing.txt"],
        "empty token list": ["heads", *m, "--layers", 0, "--token_list", no_vocab],
        "tsne without one layer": ["tsne", *m, "--neuron", 1, "--output_dir", tmp],
        "unwritable output": ["values", *m, "--layers", 0, "--output_file", "/proc/v.tsv"],
        "no model": ["values", "--layers", 0],
    }


@pytest.mark.parametrize("case", list(_bad(Path("m"), Path("t"))))
def test_bad_input_exits_2_with_one_line(case, tiny_gpt2_dir, tmp_path, capsys):
    (tmp_path / "no_vocab.txt").write_text("\n \n")
    out = tmp_path / "out.tsv"
    argv = _bad(tiny_gpt2_dir, tmp_path)[case]
    rc, _, err = run_cli([*argv, "--output_file", out] if "--output_file" not in argv and argv[0] != "tsne"
                         else argv, capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embedding_space.py: error:"), err
    assert not out.exists()


def test_bert_encoder_without_head_projects_with_input_embedding():
    """MiniLM-like encoder (no MLM head): the output embedding falls back to the input one, and says so."""
    import transformers as tf

    from fflayers.backends.hf import HFAdapter
    from fflayers.embedding_space import embedding_matrix

    cfg = tf.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                        num_hidden_layers=1, max_position_embeddings=16)
    adapter = HFAdapter(tf.BertModel(cfg), device="cpu")
    E = embedding_matrix(adapter)
    assert E.kind == "input embedding"
    torch.testing.assert_close(E.matrix, adapter.model.embeddings.word_embeddings.weight.detach())
