"""``fflayers lenses`` end to end on a tiny GPT-2 with the real tokenizer: train, eval, compare, plot, and the
one-line refusals."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from fflayers.cli.main import main
from fflayers.lenses.metrics import METRICS

LINES = ["The capital of France is Paris .", "Water is made of hydrogen and oxygen .",
         "He was born in a small village near the river .", "The album was released in 1999 .",
         "She wrote three books about the old city ."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("lens_corpus") / "text.txt"
    path.write_text("\n".join(LINES * 4) + "\n", encoding="utf-8")
    return path


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def test_train_eval_compare_plot(tiny_gpt2_dir, corpus, tmp_path, capsys):
    import transformers as tf

    model = ["--hf_model", str(tiny_gpt2_dir), "--device", "cpu"]
    lens_dir = tmp_path / "lens"
    code, err = run(["lenses", "train", *model, "--data_file", str(corpus), "--output_dir", str(lens_dir),
                     "--steps", "2", "--tokens_per_step", "16", "--max_sentences", "10", "--quiet"], capsys)
    assert code == 0, err
    assert {p.name for p in lens_dir.iterdir()} == {"config.json", "params.pt", "fflayers_lens.json"}
    meta = json.loads((lens_dir / "fflayers_lens.json").read_text())
    assert meta["kind"] == "tuned" and len(meta["losses"]) == 2

    table = tmp_path / "eval.csv"
    code, err = run(["lenses", "eval", *model, "--data_file", str(corpus), "--lens", str(lens_dir),
                     "--max_sentences", "3", "--output", str(table), "--quiet"], capsys)
    assert code == 0, err
    rows = pd.read_csv(table)
    assert list(rows.columns) == ["lens", "layer", "n_tokens", *METRICS]
    assert rows["layer"].tolist() == [0, 1, 2] and set(rows["lens"]) == {"tuned"}
    tok = tf.AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    want_tokens = sum(len(tok(line)["input_ids"]) - 1 for line in LINES[:3])  # file order, next token known
    assert (rows["n_tokens"] == want_tokens).all()
    last = rows[rows["layer"] == 2].iloc[0]  # the last state read as it is: the model's own distribution
    assert last["kl_bits"] == pytest.approx(0, abs=1e-6) and last["top1_agreement"] == 1.0
    assert (tmp_path / "eval.csv.meta.json").is_file()

    out = tmp_path / "compare.parquet"
    code, err = run(["lenses", "compare", *model, "--data_file", str(corpus), "--tuned", str(lens_dir),
                     "--max_sentences", "3", "--patchscope_layers", "1", "--output", str(out),
                     "--figure", str(tmp_path / "fig"), "--quiet"], capsys)
    assert code == 0, err
    both = pd.read_parquet(out)
    assert set(both["lens"]) == {"logit", "tuned", "patchscope"}
    assert both[both["lens"] == "patchscope"]["layer"].tolist() == [1]
    assert (tmp_path / "fig.png").stat().st_size > 0
    code, err = run(["lenses", "plot", "--input", str(out), "--output", str(tmp_path / "again")], capsys)
    assert code == 0, err
    assert (tmp_path / "again.pdf").is_file()
    assert torch.is_tensor(torch.load(lens_dir / "params.pt", weights_only=True)["0.weight"])


@pytest.mark.parametrize(("extra", "needle"), [
    (["train", "--kind", "hybrid", "--output_dir", "x"], "--kind hybrid starts at the shortcut maps"),
    (["train", "--steps", "0", "--output_dir", "x"], "--steps 0 must be >= 1"),
    (["eval", "--lens", "mat", "--output", "t.csv"], "--lens mat needs --shortcuts"),
    (["eval", "--lens", "logit", "--output", "t.xlsx"], "--output"),
    (["compare", "--tuned", "/nonexistent/lens", "--output", "t.csv"], "--tuned /nonexistent/lens does not"),
])
def test_bad_input_is_one_line(extra, needle, tiny_gpt2_dir, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sub, *rest = extra
    code, err = run(["lenses", sub, "--hf_model", str(tiny_gpt2_dir), "--data_file", str(corpus), *rest],
                    capsys)
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "t.csv").exists() and not (tmp_path / "x").exists()


def test_a_lens_of_another_model_is_refused(tiny_gpt2_dir, corpus, tmp_path, capsys):
    import transformers as tf

    from fflayers.assets import gpt2_tokenizer_dir

    other = tmp_path / "other"
    torch.manual_seed(5)
    cfg = tf.GPT2Config(vocab_size=50257, n_embd=16, n_inner=32, n_head=2, n_layer=2, n_positions=128)
    tf.GPT2LMHeadModel(cfg).save_pretrained(other)
    gpt2_tokenizer_dir(other)
    code, err = run(["lenses", "train", "--hf_model", str(other), "--data_file", str(corpus), "--output_dir",
                     str(tmp_path / "lens"), "--steps", "1", "--tokens_per_step", "8", "--quiet"], capsys)
    assert code == 0, err
    code, err = run(["lenses", "eval", "--hf_model", str(tiny_gpt2_dir), "--data_file", str(corpus), "--lens",
                     str(tmp_path / "lens"), "--output", str(tmp_path / "t.csv")], capsys)
    assert code == 2 and "was trained for model" in err and "this model is" in err, err
    assert not (tmp_path / "t.csv").exists()


def test_two_gloo_ranks_train_the_lens_of_one_process(tiny_gpt2_dir, corpus, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["lenses", "train", "--hf_model", str(tiny_gpt2_dir), "--device", "cpu", "--data_file",
             str(corpus), "--steps", "3", "--tokens_per_step", "40", "--batch_tokens", "16", "--lr", "0.5",
             "--max_sentences", "20", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    one = subprocess.run([sys.executable, "-m", "fflayers", *flags, "--output_dir", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = Path(sys.executable).parent / "torchrun"
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), "-m",
                          "fflayers", *flags, "--output_dir", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "params.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "params.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:  # the same gradients, summed in another order
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert any(float(v.abs().sum()) > 0 for v in a.values())
