"""analysis/dissect_recall.py project / extraction / enrichment / sublayer-knockout / their plots, end to end
on a tiny GPT-2 with the real BPE vocabulary: tables equal the library on the same facts, bad input is one
line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis import dissect_recall as dr

FACTS = [
    {"known_id": 0, "subject": "Norway", "attribute": "Oslo", "prompt": "The capital of Norway is"},
    {"known_id": 1, "subject": "Chile", "attribute": "Santiago", "prompt": "Chile has its capital in"},
    {"known_id": 2, "subject": "Peru", "attribute": "Lima", "prompt": "The capital city of Peru is"},
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("recall_inputs")
    facts = d / "facts.json"
    facts.write_text(json.dumps(FACTS))
    paragraphs = d / "paragraphs.txt"
    paragraphs.write_text("Norway has fjords, oil and salmon.\n\nChile and Norway export fish and copper.\n"
                          "Nothing about anyone.\n")
    return facts, paragraphs


def run_cli(argv, capsys):
    capsys.readouterr()
    rc = dr.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def adapter(tiny_gpt2_dir):
    from fflayers.backends.hf import load_hf_lm

    return load_hf_lm(str(tiny_gpt2_dir), device="cpu")


def encoded(adapter, facts_path):
    from fflayers.recall import encode_facts, load_facts

    enc, skipped = encode_facts(adapter, load_facts(facts_path))
    assert not skipped
    return enc


def test_project_and_extraction(tiny_gpt2_dir, inputs, tmp_path, capsys, adapter):
    from fflayers.recall import extraction_events, vocabulary_projections

    facts, _ = inputs
    model = ["--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet", "--facts", facts]
    out = tmp_path / "proj.tsv"
    rc, stdout, err = run_cli(["project", *model, "--positions", "subject_last", "last", "--k", 3,
                               "--no_final_norm", "--layers", 1, "--output", out], capsys)
    assert rc == 0, err
    assert "top-1 token per layer" in stdout
    got = pd.read_csv(out, sep="\t", keep_default_na=False)
    expected = vocabulary_projections(adapter, encoded(adapter, facts), layers=[1],
                                      positions=["subject_last", "last"], k=3, final_norm=False)
    assert len(got) == 3 * 3 * 2 * 3
    assert got["token_id"].tolist() == expected["token_id"].tolist()
    assert got["logprob"].tolist() == pytest.approx(expected["logprob"].tolist(), abs=1e-5)
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["config"]["final_norm"] is False and "facts" in meta["inputs"]

    out = tmp_path / "ext.parquet"
    rc, stdout, err = run_cli(["extraction", *model, "--variants", "none", "block_last", "--batch_size", 2,
                               "--output", out], capsys)
    assert rc == 0, err
    assert "attn_events" in stdout
    got = pd.read_parquet(out)
    expected = extraction_events(adapter, encoded(adapter, facts), variants=["none", "block_last"])
    pd.testing.assert_frame_equal(
        got.sort_values(["known_id", "variant", "sublayer", "layer"]).reset_index(drop=True),
        expected.sort_values(["known_id", "variant", "sublayer", "layer"]).reset_index(drop=True),
        check_dtype=False)
    rc, stdout, err = run_cli(["plot", "--kind", "extraction", "--input", out, "--output",
                               tmp_path / "ext"], capsys)
    assert rc == 0, err
    assert (tmp_path / "ext.png").is_file() and (tmp_path / "ext.pdf").is_file()


def test_enrichment_and_sublayer_knockout(tiny_gpt2_dir, inputs, tmp_path, capsys, adapter):
    from fflayers.recall import attributes_rate, read_paragraphs, sublayer_knockout

    facts, paragraphs = inputs
    model = ["--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet", "--facts", facts]
    out = tmp_path / "enr.parquet"
    rc, stdout, err = run_cli(["enrichment", *model, "--paragraphs", paragraphs, "--top", 100, "--keep", 20,
                               "--output", out], capsys)
    assert rc == 0, err
    assert "1 subject(s) have no paragraph" in stdout and "Peru" in stdout
    got = pd.read_parquet(out)
    lines = read_paragraphs(paragraphs)
    assert len(lines) == 3
    expected = attributes_rate(adapter, encoded(adapter, facts), lines, top=100, keep=20)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    rc, _, err = run_cli(["plot", "--kind", "enrichment", "--input", out, "--output",
                          tmp_path / "enr"], capsys)
    assert rc == 0, err

    out = tmp_path / "sub.csv"
    rc, stdout, err = run_cli(["sublayer-knockout", *model, "--paragraphs", paragraphs, "--top", 100,
                               "--keep", 20, "--window", 0, "--kinds", "mlp", "--output", out], capsys)
    assert rc == 0, err
    got = pd.read_csv(out)
    expected = sublayer_knockout(adapter, encoded(adapter, facts), lines, kinds=["mlp"], window=0,
                                 top=100, keep=20)
    assert len(got) == 3 * (1 + 2)
    assert got["attribute_prob"].tolist() == pytest.approx(expected["attribute_prob"].tolist(), rel=1e-5)
    assert got["rate"].fillna(-1).tolist() == pytest.approx(expected["rate"].fillna(-1).tolist())
    rc, _, err = run_cli(["plot", "--kind", "sublayer-knockout", "--input", out, "--output",
                          tmp_path / "sub"], capsys)
    assert rc == 0, err
    assert (tmp_path / "sub.pdf").is_file()


@pytest.mark.parametrize("extra, message", [
    (["project", "--positions", "middle"], "unknown position 'middle'"),
    (["project", "--k", 0], "--k 0 must be >= 1"),
    (["project", "--points", "mlp_coef"], "invalid choice: 'mlp_coef'"),
    (["extraction", "--variants", "none", "patch_subject", "--patch_layer", 7], "layer 7 is out of range"),
    (["extraction", "--variants", "block_everything"], "invalid choice: 'block_everything'"),
    (["enrichment", "--paragraphs", "/nonexistent/p.txt"], "--paragraphs /nonexistent/p.txt does not exist"),
    (["enrichment", "--paragraphs", "PARAGRAPHS", "--keep", 0], "--keep 0 must be >= 1"),
    (["enrichment", "--paragraphs", "PARAGRAPHS", "--positions", 40], "position 40 is out of range"),
    (["sublayer-knockout", "--paragraphs", "PARAGRAPHS", "--window", -1], "--window -1 must be >= 0"),
    (["sublayer-knockout", "--paragraphs", "PARAGRAPHS", "--starts", 5], "start layer 5 is out of range"),
    (["sublayer-knockout"], "the following arguments are required: --paragraphs"),
])
def test_bad_input_is_one_line(extra, message, tiny_gpt2_dir, inputs, tmp_path, capsys):
    facts, paragraphs = inputs
    extra = [paragraphs if a == "PARAGRAPHS" else a for a in extra]
    argv = [*extra, "--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet", "--facts", facts,
            "--output", tmp_path / "x.parquet"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.parquet").exists()


def test_plot_of_a_missing_table(tmp_path, capsys):
    rc, _, err = run_cli(["plot", "--kind", "enrichment", "--input", tmp_path / "none.parquet", "--output",
                          tmp_path / "f"], capsys)
    assert rc == 2 and "does not exist" in err
