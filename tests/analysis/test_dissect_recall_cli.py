"""analysis/dissect_recall.py end to end on a tiny GPT-2 with the real BPE vocabulary: facts, knockout,
resume, plot, and bad input (one line on stderr, exit code 2, the run going on without the bad facts)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from analysis import dissect_recall as dr

FACTS = [
    {"known_id": 0, "subject": "France", "attribute": "Paris", "prompt": "The capital of France is"},
    {"known_id": 1, "subject": "Tim Cook", "attribute": "Apple", "prompt": "Tim Cook is the CEO of"},
    {"known_id": 2, "subject": "Beats Music", "attribute": "Apple", "prompt": "The owner of Beats Music is"},
]
BAD = [
    {"known_id": 7, "subject": "Spain", "attribute": "Madrid", "prompt": "The capital of France is"},
    {"known_id": 8, "subject": "Spain", "prompt": "The capital of Spain is"},
]


def run_cli(argv, capsys):
    capsys.readouterr()
    rc = dr.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "known.json"
    path.write_text(json.dumps(FACTS + BAD))
    return path


def model_args(tiny_gpt2_dir):
    return ["--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet"]


def top1_probability(tiny_gpt2_dir, prompt: str) -> float:
    """The model's top-1 probability after the prompt, straight from transformers."""
    import transformers as tf

    tok = tf.GPT2TokenizerFast.from_pretrained(tiny_gpt2_dir)
    model = tf.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
    return float(torch.softmax(logits.double(), -1).max())


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_knockout_writes_table_meta_and_skips_bad_facts(suffix, tiny_gpt2_dir, facts_file, tmp_path, capsys):
    out = tmp_path / f"knockout{suffix}"
    rc, stdout, err = run_cli(["knockout", *model_args(tiny_gpt2_dir), "--facts", facts_file, "--output", out,
                               "--window", 1, "--sets", "subject", "non_subject", "last", "first"], capsys)
    assert rc == 0, err
    assert "fact 8 has no field attribute" in err and "fact 7: subject 'Spain' is not in the prompt" in err
    assert "1 fact(s) skipped: cannot be read" in err and "1 fact(s) skipped: cannot be encoded" in err
    table = dr.read_table(out)
    assert list(table.columns) == ["known_id", "subject", "attribute", "set", "layer", "window_start",
                                   "window_end", "p", "p_new", "rel_change_pct"]
    assert len(table) == 3 * 2 * 4 and table["known_id"].drop_duplicates().tolist() == [0, 1, 2]
    meta = json.loads((tmp_path / f"knockout{suffix}.meta.json").read_text())
    assert meta["config"]["window"] == 1 and "facts" in meta["inputs"]
    assert table[table.known_id == 0]["p"].iloc[0] == pytest.approx(
        top1_probability(tiny_gpt2_dir, FACTS[0]["prompt"]), rel=1e-5)
    assert "mean relative change" in stdout and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["known.json", f"knockout{suffix}", f"knockout{suffix}.meta.json"])


def test_resume_writes_the_same_table_and_removes_its_run_folder(tiny_gpt2_dir, facts_file, tmp_path,
                                                                 capsys):
    out, again = tmp_path / "k.parquet", tmp_path / "again.parquet"
    argv = ["knockout", *model_args(tiny_gpt2_dir), "--facts", facts_file, "--window", 1]
    assert run_cli([*argv, "--output", out], capsys)[0] == 0
    rc, stdout, err = run_cli([*argv, "--output", again, "--resume"], capsys)
    assert rc == 0, err
    assert "1 shard(s) of 3 facts; computed 1, reused 0 finished shard(s)" in stdout
    assert again.read_bytes() == out.read_bytes()
    assert not (tmp_path / "again.parquet.ckpt").exists() and not list(tmp_path.glob("*.partial.*"))
    meta = json.loads((tmp_path / "again.parquet.meta.json").read_text())
    plain = json.loads((tmp_path / "k.parquet.meta.json").read_text())
    assert meta["config"] == plain["config"] and meta["config"]["window"] == 1
    assert meta["where"] == {**plain["where"], "output": str(again), "resume": True}


def test_facts_filter_keeps_what_the_model_predicts(tiny_gpt2_dir, tmp_path, capsys):
    import transformers as tf

    tok = tf.GPT2TokenizerFast.from_pretrained(tiny_gpt2_dir)
    model = tf.GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    countries = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid")]
    # plant: make two capitals the model's own top-1 word after the prompt
    planted = []
    for i, (country, capital) in enumerate(countries):
        prompt = f"The capital of {country} is"
        with torch.no_grad():
            top = int(model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax())
        word = tok.decode([top])
        if i < 2 and word.startswith(" ") and word.strip().isalpha():
            capital = word.strip()
        planted.append((country, capital))
    path = tmp_path / "countries.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(f"{i}:X{i}:XX{i}:{c}:{cap}\n" for i, (c, cap) in enumerate(planted))
    expected = []
    for i, (country, capital) in enumerate(planted):
        prompt = f"The capital of {country} is"
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            top = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if top == tok(f"{prompt} {capital}")["input_ids"][len(ids)]:
            expected.append(i)
    out = tmp_path / "caps.json"
    argv = ["facts", *model_args(tiny_gpt2_dir), "--countries", "--countries_file", path, "--output", out]
    rc, stdout, err = run_cli([*argv, "--filter"], capsys)
    if not expected:
        assert rc == 2 and "no fact left" in err
        return
    assert rc == 0, err
    kept = json.loads(out.read_text())
    assert [f["known_id"] for f in kept] == expected
    assert f"{len(expected)} of 4 facts predicted correctly" in stdout
    assert run_cli(argv, capsys)[0] == 0 and len(json.loads(out.read_text())) == 4


def test_plot_knockout(tiny_gpt2_dir, facts_file, tmp_path, capsys):
    out = tmp_path / "k.csv"
    assert run_cli(["knockout", *model_args(tiny_gpt2_dir), "--facts", facts_file, "--output", out],
                   capsys)[0] == 0
    rc, stdout, err = run_cli(["plot", "--kind", "knockout", "--input", out, "--output",
                               tmp_path / "fig"], capsys)
    assert rc == 0, err
    assert (tmp_path / "fig.png").stat().st_size > 1000 and (tmp_path / "fig.pdf").is_file()


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("[{\"known_id\": 0", "not valid JSON"),
    (json.dumps(BAD[1:]), "holds no usable fact"),
    (json.dumps(BAD), "no fact left to analyse"),
])
def test_bad_fact_files_are_one_line_errors(content, message, tiny_gpt2_dir, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(content)
    rc, _, err = run_cli(["knockout", *model_args(tiny_gpt2_dir), "--facts", path, "--output",
                          tmp_path / "k.csv"], capsys)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2 and len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "k.csv").exists()


def test_bad_options_are_one_line_errors(tiny_gpt2_dir, facts_file, tmp_path, capsys):
    cases = [
        (["facts", *model_args(tiny_gpt2_dir), "--facts", facts_file, "--output", tmp_path / "f.csv"],
         ".json name"),
        (["knockout", *model_args(tiny_gpt2_dir), "--facts", facts_file, "--output", tmp_path / "k.txt"],
         "table file"),
        (["knockout", *model_args(tiny_gpt2_dir), "--facts", tmp_path / "none.json", "--output",
          tmp_path / "k.csv"], "does not exist"),
        (["knockout", *model_args(tiny_gpt2_dir), "--output", tmp_path / "k.csv"], "--facts"),
        (["plot", "--kind", "nothing", "--input", tmp_path / "k.csv", "--output", tmp_path / "f"], "unknown"),
    ]
    for argv, message in cases:
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and message in err and err.count("\n") == 1, (argv, err)
