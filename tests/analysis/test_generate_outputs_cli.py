"""analysis/generate_outputs.py end to end (tiny GPT-2 with the real BPE tokenizer; tiny fairseq LM),
against a brute force over single-sentence runs with plain torch hooks; every bad input exits with code 2."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import generate_outputs as go
from analysis import trigger_examples_jsonl_to_textual as to_textual
from fflayers.data import read_corpus, read_wikitext_lines, shuffled_sentences
from fflayers.memories.textual import read_textual_dir
from tests.memories.test_trigger_examples import check_key, expected_topk, key_columns

REPO = Path(__file__).resolve().parents[2]
LINES = [
    "The old bridge crossed the river near the town. It was built in 1850 by local workers.",
    "Mary visited the museum in Paris last summer. She liked the paintings very much.",
    "The team won the final game of the season. Their coach praised the young players.",
    "A small village lies in the northern valley. Farmers grow wheat and barley there.",
    "The king built a castle on the hill. His army defended it for many years.",
    "Scientists found water on the distant moon. The discovery surprised everyone.",
    "The album was recorded in London in 1969. It sold millions of copies.",
    "Trains leave the central station every hour. The journey takes forty minutes.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def keys_of_model(model: torch.nn.Module, family: str):
    if family == "gpt2":
        return [block.mlp.c_fc for block in model.transformer.h]
    return [layer.fc1 for layer in model.decoder.layers]


def brute_force(run_one, sentences: list[list[int]], fc_in: list[torch.nn.Module], dims) -> dict:
    """``{(layer, dim): per-sentence activations}``: each sentence run alone, plain torch hooks on fc1."""
    per_sentence = []
    for seq in sentences:
        acts = {}
        handles = [m.register_forward_hook(
                       lambda _m, _a, out, i=i, acts=acts: acts.__setitem__(i, out.detach()))
                   for i, m in enumerate(fc_in)]
        try:
            with torch.no_grad():
                run_one(seq)
        finally:
            for h in handles:
                h.remove()
        per_sentence.append({i: a.reshape(len(seq), -1) for i, a in acts.items()})
    return key_columns(per_sentence, range(len(fc_in)), dims)


def check_jsonl(path: Path, columns: dict, texts: list[str], dims, n_layers: int, k: int) -> None:
    """Original schema; each key's records are a correct top-k (see check_key) with the right texts."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["dim"] for r in rows] == list(dims)
    text_ids = {t: i for i, t in enumerate(texts)}
    assert len(text_ids) == len(texts)  # texts identify sentences
    for row in rows:
        assert len(row["top_values"]) == n_layers
        for layer, recs in enumerate(row["top_values"]):
            assert [(r["rank"], r["layer_index"]) for r in recs] == [(i, layer) for i in range(len(recs))]
            got = [(r["fc1_value"], text_ids[r["text"]], r["token_indice"]) for r in recs]
            check_key(got, columns[layer, row["dim"]], k)


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = go.main([*map(str, argv), "--quiet"])
    return rc, capsys.readouterr().err


# ----- HuggingFace ------------------------------------------------------------------------------------------


def test_hf_trigger_examples_end_to_end(tiny_gpt2_dir, corpus, tmp_path, capsys):
    from fflayers.backends.hf import load_hf_lm

    out = tmp_path / "top.jsonl"
    rc, err = run_cli(["--data_file", corpus, "--hf_model", tiny_gpt2_dir, "--get_trigger_examples",
                       "--extract_mode", "layer-raw", "--top_k_trigger_examples", 4, "--output_file", out,
                       "--device", "cpu", "--batch_tokens", 64], capsys)
    assert rc == 0, err
    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    sentences = shuffled_sentences(read_corpus(corpus), seed=0xDEAD, pretokenized=False)
    assert len(sentences) == 16
    ids = [adapter.tokenizer(s)["input_ids"] for s in sentences]
    columns = brute_force(lambda seq: adapter.model(input_ids=torch.tensor([seq])), ids,
                          keys_of_model(adapter.model, "gpt2"), range(32))
    check_jsonl(out, columns, sentences, range(32), 2, k=4)
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["config"]["top_k_trigger_examples"] == 4 and meta["config"]["n_sentences"] == 16
    assert meta["inputs"]["data_file"]

    # textual files from the JSONL: one per key, prefix up to the trigger, next token starred
    rc = to_textual.main(["--input_file", str(out), "--hf_model", str(tiny_gpt2_dir), "--output_dir",
                          str(tmp_path / "txt"), "--quiet"])
    assert rc == 0
    textual = read_textual_dir(tmp_path / "txt")
    assert len(textual) == 2 * 32
    value, sid, pos = expected_topk(columns[1, 5], 4)[0]
    toks = ids[sid]
    first = textual[1, 5][0]
    assert first[0] == pytest.approx(value, rel=1e-5)
    assert first[1] == adapter.tokenizer.decode(toks[: pos + 1]).strip()
    assert first[2] == (adapter.tokenizer.decode([toks[pos + 1]]).strip() if pos + 1 < len(toks) else "</s>")


@pytest.mark.parametrize("suffix", [".pkl", ".parquet"])
def test_hf_table_dims_layers_and_resume(suffix, tiny_gpt2_dir, corpus, tmp_path, capsys):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow", exc_type=ImportError)
    out = tmp_path / f"top{suffix}"
    rc, err = run_cli(["--data_file", corpus, "--hf_model", tiny_gpt2_dir, "--get_trigger_examples",
                       "--top_k_trigger_examples", 3, "--dims_for_analysis", 7, 2, "--layers", 1,
                       "--output_file", out, "--device", "cpu", "--max_sentences", 10, "--resume",
                       "--seed", 5], capsys)
    assert rc == 0, err
    assert not Path(str(out) + ".ckpt").exists()  # removed after success
    table = pd.read_parquet(out) if suffix == ".parquet" else pd.read_pickle(out)
    assert list(table.columns) == ["layer", "dim", "rank", "sentence_id", "position", "value", "text"]
    assert set(table.layer) == {1} and set(table.dim) <= {7, 2}
    from fflayers.backends.hf import load_hf_lm

    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    sentences = shuffled_sentences(read_corpus(corpus), seed=5, max_sentences=10, pretokenized=False)
    ids = [adapter.tokenizer(s)["input_ids"] for s in sentences]
    columns = brute_force(lambda seq: adapter.model(input_ids=torch.tensor([seq])), ids,
                          keys_of_model(adapter.model, "gpt2"), [7, 2])
    for dim in (7, 2):
        sub = table[table.dim == dim].sort_values("rank")
        assert list(sub["rank"]) == list(range(len(sub)))
        assert list(sub.text) == [sentences[s] for s in sub.sentence_id]
        check_key(list(zip(sub.value, sub.sentence_id, sub.position, strict=True)), columns[1, dim], 3)


def test_ffn_info_resume(tiny_gpt2_dir, corpus, tmp_path, capsys):
    """--resume with --extract_ffn_info: the table of a run without it, the run folder removed
    (interrupted runs and other configurations: tests/analysis/test_scale_out.py)."""
    base = ["--data_file", corpus, "--hf_model", tiny_gpt2_dir, "--extract_ffn_info", "--extract_mode", "dim",
            "--dims_for_analysis", 3, 1, "--max_sentences", 10, "--device", "cpu"]
    plain, out = tmp_path / "plain.pkl", tmp_path / "dim.pkl"
    assert run_cli([*base, "--output_file", plain], capsys)[0] == 0
    rc, err = run_cli([*base, "--output_file", out, "--resume"], capsys)
    assert rc == 0, err
    got, want = pd.read_pickle(out), pd.read_pickle(plain)
    assert len(got) == 10 * 2 and list(got.columns) == list(want.columns)
    for col in want.columns:
        x, y = want[col].to_numpy(), got[col].to_numpy()
        assert all(np.array_equal(a, b) for a, b in zip(x, y, strict=True)), col
    assert not (tmp_path / "dim.pkl.ckpt").exists()


def test_script_runs_as_a_program(tiny_gpt2_dir, corpus, tmp_path):
    out = tmp_path / "info.pkl"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    argv = [sys.executable, str(REPO / "analysis" / "generate_outputs.py"), "--data_file", str(corpus),
            "--hf_model", str(tiny_gpt2_dir), "--extract_ffn_info", "--extract_mode", "layer",
            "--max_sentences", "6", "--output_file", str(out), "--device", "cpu", "--quiet"]
    proc = subprocess.run(argv,
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out, "rb") as f:
        df = pickle.load(f)
    assert isinstance(df, pd.DataFrame) and len(df) > 0


# ----- bad input --------------------------------------------------------------------------------------------


def bad_cases(model: Path, corpus: Path, tmp: Path) -> dict[str, list]:
    empty = tmp / "empty.txt"  # written by the test
    base = ["--data_file", corpus, "--hf_model", model, "--device", "cpu"]
    trig = [*base, "--get_trigger_examples", "--extract_mode", "layer-raw"]
    return {
        "dims out of range": [*trig, "--dims_for_analysis", 0, 32],
        "negative dim": [*trig, "--dims_for_analysis", -1],
        "layer out of range": [*trig, "--layers", 5],
        "empty data file": ["--data_file", empty, "--hf_model", model, "--get_trigger_examples"],
        "missing data file": ["--data_file", tmp / "nope.txt", "--hf_model", model, "--get_trigger_examples"],
        "k = 0": [*trig, "--top_k_trigger_examples", 0],
        "k < 0": [*trig, "--top_k_trigger_examples", -3],
        "trigger examples with layer mode": [*base, "--get_trigger_examples", "--extract_mode", "layer"],
        "ffn info with layer-raw": [*base, "--extract_ffn_info", "--extract_mode", "layer-raw"],
        "ffn info with default mode": [*base, "--extract_ffn_info"],
        "neither analysis": [*base, "--extract_mode", "layer"],
        "both analyses": [*base, "--get_trigger_examples", "--extract_ffn_info", "--extract_mode", "layer"],
        "no model": ["--data_file", corpus, "--get_trigger_examples"],
        "both models": [*trig, "--model_dir", tmp],
        "bad mode": [*base, "--extract_ffn_info", "--extract_mode", "neuron"],
        "max_sentences 0": [*trig, "--max_sentences", 0],
        "missing model folder": ["--data_file", corpus, "--hf_model", tmp / "no_model",
                                 "--get_trigger_examples"],
    }


@pytest.mark.parametrize("case", list(bad_cases(Path("m"), Path("c"), Path("t"))))
def test_bad_input_exits_2_with_one_line(case, tiny_gpt2_dir, corpus, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = bad_cases(tiny_gpt2_dir, corpus, tmp_path)[case]
    out = tmp_path / "out.jsonl"
    rc, err = run_cli([*argv, "--output_file", out], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("generate_outputs.py: error:"), err
    assert not out.exists() and not Path(str(out) + ".meta.json").exists()


def test_unwritable_output_path(tiny_gpt2_dir, corpus, tmp_path, capsys):
    # /proc: a folder that exists and looks writable to root, but refuses new files
    for out in (tmp_path / "no_such_dir" / "out.jsonl", tmp_path, Path("/proc/x.jsonl")):
        rc, err = run_cli(["--data_file", corpus, "--hf_model", tiny_gpt2_dir, "--get_trigger_examples",
                           "--output_file", out], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "output" in err
    assert not (tmp_path / "no_such_dir").exists()


WIKITEXT = [
    " = Heading = ",
    " The state @-@ of @-@ the @-@ art bridge cost 1 @,@ 000 dollars , said John 's report . ",
    " Pi is about 3 @.@ 14 ( a constant ) . ",
]


def test_hf_model_reads_wikitext_detokenized_unless_raw(tiny_gpt2_dir, tmp_path, capsys):
    from fflayers.data import detokenize_wikitext

    data = tmp_path / "wiki.valid.tokens"
    data.write_text("\n".join(WIKITEXT) + "\n", encoding="utf-8")
    texts = {}
    for flag in ([], ["--raw_wikitext"]):
        out = tmp_path / f"t{len(flag)}.jsonl"
        rc, err = run_cli(["--data_file", data, "--hf_model", tiny_gpt2_dir, "--get_trigger_examples",
                           "--top_k_trigger_examples", 50, "--output_file", out, *flag], capsys)
        assert rc == 0, err
        texts[bool(flag)] = {r["text"] for row in map(json.loads, out.read_text().splitlines())
                             for layer in row["top_values"] for r in layer}
    raw = set(shuffled_sentences(read_wikitext_lines(data), seed=0xDEAD))
    assert texts[True] <= raw and "@-@" in "".join(texts[True])
    assert texts[False] <= {detokenize_wikitext(s) for s in raw}
    assert "The state-of-the-art bridge cost 1,000 dollars, said John's report." in texts[False]


def test_subword_pipeline_through_the_clis_maps_no_target_to_unk(tiny_gpt2_dir, corpus, tmp_path, capsys):
    """generate_outputs -> textual -> key_value_agreement: exact target ids, so nothing becomes unk."""
    from analysis import key_value_agreement as kva

    trig = tmp_path / "top.jsonl"
    rc, err = run_cli(["--data_file", corpus, "--hf_model", tiny_gpt2_dir, "--get_trigger_examples",
                       "--top_k_trigger_examples", 5, "--output_file", trig], capsys)
    assert rc == 0, err
    assert to_textual.main(["--input_file", str(trig), "--hf_model", str(tiny_gpt2_dir), "--output_dir",
                            str(tmp_path / "txt"), "--quiet"]) == 0
    capsys.readouterr()
    assert kva.main(["--hf_model", str(tiny_gpt2_dir), "--data_dir", str(tmp_path / "txt"), "--output_base",
                     str(tmp_path / "kv"), "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "exact token ids stored by the textual step; 0 not in the vocabulary" in out, out


# ----- fairseq ----------------------------------------------------------------------------------------------


def test_fairseq_model_dir_end_to_end(fairseq_adaptive_lm, tmp_path, capsys):
    from fflayers.backends.fairseq_loading import load_fairseq_lm

    lm = fairseq_adaptive_lm
    out = tmp_path / "top.jsonl"
    rc, err = run_cli(["--data_file", lm.valid, "--model_dir", lm.model_dir, "--get_trigger_examples",
                       "--extract_mode", "layer-raw", "--top_k_trigger_examples", 5, "--max_sentences", 40,
                       "--dims_for_analysis", 3, 100, 255, "--output_file", out, "--device", "cpu",
                       "--batch_tokens", 256], capsys)
    assert rc == 0, err
    adapter = load_fairseq_lm(lm.model_dir, device="cpu")
    sentences = shuffled_sentences(read_wikitext_lines(lm.valid), seed=0xDEAD, max_sentences=40)
    d = adapter.dictionary
    ids = [[d.eos(), *(d.index(w) for w in s.split())] for s in sentences]
    model = adapter.model
    columns = brute_force(lambda seq: model(torch.tensor([seq])), ids, keys_of_model(model, "fairseq"),
                          [3, 100, 255])
    check_jsonl(out, columns, [" ".join(s.split()) for s in sentences], [3, 100, 255], adapter.n_layers, k=5)

    rc = to_textual.main(["--input_file", str(out), "--model_dir", str(lm.model_dir), "--output_dir",
                          str(tmp_path / "txt"), "--quiet"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    top = rows[1]["top_values"][0][0]  # dim 100, layer 0, rank 0
    value, pos = top["fc1_value"], top["token_indice"]
    sid = [" ".join(s.split()) for s in sentences].index(top["text"])
    words = sentences[sid].split()
    nxt = words[pos] if pos < len(words) else "</s>"
    assert read_textual_dir(tmp_path / "txt")[0, 100][0] == (pytest.approx(value, rel=1e-5),
                                                             " ".join(words[:pos]), nxt)


def test_fairseq_corpus_outside_dictionary(fairseq_adaptive_lm, tmp_path, capsys):
    data = tmp_path / "alien.tokens"
    data.write_text(" zqx vrok plimb the gnarf wuzz .\n qorp zindle flarb snerk .\n", encoding="utf-8")
    out = tmp_path / "top.jsonl"
    rc, err = run_cli(["--data_file", data, "--model_dir", fairseq_adaptive_lm.model_dir,
                       "--get_trigger_examples", "--output_file", out, "--device", "cpu"], capsys)
    assert rc == 2 and "unknown" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
