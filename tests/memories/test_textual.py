"""Textual trigger-example files: exact format on hand-made input, round trip, subword tokenizers, CLI."""

from __future__ import annotations

import json

import pytest

from analysis import trigger_examples_jsonl_to_textual as cli
from fflayers.core import FflayersError
from fflayers.memories.textual import (
    SubwordTokens,
    WordLevel,
    check_vocabulary,
    format_line,
    parse_line,
    read_marker,
    read_textual_dir,
    vocabulary_digest,
    write_textual,
)
from tests.fixtures.fairseq_models import needs_fairseq

TEXT = "the cat sat on the mat"


def rec(rank, layer, pos, value, text=TEXT):
    return {"rank": rank, "layer_index": layer, "token_indice": pos, "fc1_value": value, "text": text}


ROWS = [
    {"dim": 3, "top_values": [
        [rec(0, 0, 3, 3.14), rec(1, 0, 0, 2.5)],
        [rec(0, 1, 6, 1.0), rec(1, 1, 1, 0.25, "a * b")],
    ]},
    {"dim": 7, "top_values": [[], [rec(0, 1, 2.0, 9.75)]]},  # token_indice as float, as the original wrote it
]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "top.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def test_exact_files_for_word_level_model(jsonl, tmp_path):
    out = tmp_path / "out"
    assert write_textual(jsonl, out, WordLevel(), progress=False) == 4
    assert sorted(p.name for p in out.iterdir()) == ["3_0.txt", "3_1.txt", "7_0.txt", "7_1.txt",
                                                     "textual.json"]
    # input </s> the cat sat on the mat: position 3 holds "sat" and predicts "on"; position 0 (</s>) "the"
    assert (out / "3_0.txt").read_text() == "3.14\tthe cat sat *on*\n2.5\t*the*\n"
    # the last position predicts the end of the sentence
    assert (out / "3_1.txt").read_text() == "1.0\tthe cat sat on the mat *</s>*\n0.25\ta ***\n"
    assert (out / "7_0.txt").read_text() == ""
    assert (out / "7_1.txt").read_text() == "9.75\tthe cat *sat*\n"


def test_read_textual_dir_round_trip(jsonl, tmp_path):
    write_textual(jsonl, tmp_path / "out", WordLevel(), progress=False)
    got = read_textual_dir(tmp_path / "out")
    assert got == {
        (0, 3): [(3.14, "the cat sat", "on"), (2.5, "", "the")],
        (1, 3): [(1.0, "the cat sat on the mat", "</s>"), (0.25, "a", "*")],
        (0, 7): [],
        (1, 7): [(9.75, "the cat", "sat")],
    }


@pytest.mark.parametrize("prefix,target", [("a b", "c"), ("", "x"), ("x * y", "*"), ("tab\there", "t\nt")])
def test_format_parse_inverse(prefix, target):
    line = format_line(1.5, prefix, target)
    assert "\n" not in line and line.count("\t") == 1
    assert parse_line(line) == (1.5, prefix.replace("\t", " "), target.replace("\n", " "))


def test_word_level_position_out_of_range():
    with pytest.raises(FflayersError, match="out of range"):
        WordLevel().prefix_and_target("a b", 3)


class FakeSubwordVocab:
    """Splits words into 2-character pieces; BOS id 0; pieces after the first of a word carry no space."""

    bos_id = 0

    def __init__(self):
        self.pieces: dict[str, int] = {"<bos>": 0}

    def _piece_ids(self, text):
        out = []
        for w in text.split():
            for j in range(0, len(w), 2):
                piece = (" " if j == 0 else "") + w[j : j + 2]
                out.append(self.pieces.setdefault(piece, len(self.pieces)))
        return out

    def tokenize(self, text, add_bos=True):
        return ([0] if add_bos else []) + self._piece_ids(text)

    def id_to_token(self, ids):
        inv = {v: k for k, v in self.pieces.items()}
        return [inv[i] for i in ids]

    def detokenize(self, ids):
        return "".join(self.id_to_token([i for i in ids if i != 0]))


def test_subword_prefix_and_target():
    tokens = SubwordTokens(FakeSubwordVocab())
    # input: <bos> " th" "e" " ca" "t" " sa" "t": position 2 holds "e" and predicts " ca"
    assert tokens.prefix_and_target("the cat sat", 2) == ("the", "ca")
    assert tokens.prefix_and_target("the cat sat", 3) == ("the ca", "t")
    assert tokens.prefix_and_target("the cat sat", 0) == ("", "th")
    assert tokens.prefix_and_target("the cat sat", 6) == ("the cat sat", "</s>")
    with pytest.raises(FflayersError, match="out of range"):
        tokens.prefix_and_target("the cat sat", 7)


def test_gpt2_tokenizer_via_cli(jsonl, tmp_path):
    from fflayers.assets import gpt2_tokenizer_dir

    model = gpt2_tokenizer_dir(tmp_path / "tok")
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    rows = [{"dim": 0, "top_values": [[rec(0, 0, 2, 1.5)]]}]  # GPT-2: no BOS; position 2 = " sat"
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    assert cli.main(["--input_file", str(path), "--hf_model", str(model), "--output_dir", str(tmp_path / "g"),
                     "--quiet"]) == 0
    assert (tmp_path / "g" / "0_0.txt").read_text() == "1.5\tthe cat sat *on*\n"


@needs_fairseq
def test_cli_refuses_non_empty_dir_without_overwrite(jsonl, tmp_path, capsys):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "dict.txt").write_text("the 5\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    args = ["--input_file", str(jsonl), "--model_dir", str(model_dir), "--output_dir", str(out), "--quiet"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--overwrite" in err and "\n" not in err
    assert not (out / "3_0.txt").exists()
    assert cli.main([*args, "--overwrite"]) == 0
    assert (out / "3_0.txt").read_text().startswith("3.14\tthe cat sat *on*\n")


@needs_fairseq
def test_cli_default_output_dir_and_bad_input(jsonl, tmp_path, capsys):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "dict.txt").write_text("the 5\n")
    assert cli.main(["--input_file", str(jsonl), "--model_dir", str(model_dir), "--quiet"]) == 0
    assert (tmp_path / "top.outp" / "7_1.txt").is_file()
    bad = [
        ["--input_file", str(tmp_path / "missing.jsonl"), "--model_dir", str(model_dir), "--output_dir",
         str(tmp_path / "x")],
        ["--input_file", str(jsonl), "--output_dir", str(tmp_path / "y")],  # no model
        ["--input_file", str(jsonl), "--model_dir", str(tmp_path), "--output_dir",
         str(tmp_path / "z")],  # no dict.txt
        ["--input_file", str(jsonl), "--model_dir", str(model_dir), "--output_dir",
         "/proc/fflayers_out"],  # no files
    ]
    for argv in bad:
        capsys.readouterr()
        assert cli.main([*argv, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err and "\n" not in err
    assert not any((tmp_path / d).exists() for d in "xyz")


def test_marker_counts_files_lines_input_and_vocabulary(jsonl, tmp_path):
    import hashlib

    from transformers import AutoTokenizer

    from fflayers.assets import gpt2_tokenizer_dir
    from fflayers.backends.hf_vocab import HFVocabulary

    model = gpt2_tokenizer_dir(tmp_path / "tok")
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    tok = AutoTokenizer.from_pretrained(str(model))
    vocab = HFVocabulary(tok, None, len(tok))
    out = tmp_path / "out"
    write_textual(jsonl, out, WordLevel(), progress=False, vocabulary=vocab)
    marker = read_marker(out)
    assert marker["files"] == 4 and marker["lines"] == 5 and marker["target_ids"] is False
    assert marker["input_sha256"] == hashlib.sha256(jsonl.read_bytes()).hexdigest()
    tokens = [tok.decode([i]) for i in range(len(tok))]  # each id as decoded text
    assert marker["vocabulary"] == {"size": len(tok),
                                    "sha256": hashlib.sha256("\n".join(tokens).encode()).hexdigest()}
    # a model whose embedding is padded past the tokenizer (GPT-NeoX style) has the same first entries
    check_vocabulary(out, HFVocabulary(tok, None, len(tok) + 47))
    with pytest.raises(FflayersError, match=r"another vocabulary \(50257 tokens\) than this model's \(100"):
        check_vocabulary(out, HFVocabulary(tok, None, 100))
    assert vocabulary_digest(vocab, 3)["size"] == 3


def test_malformed_line_leaves_no_file_and_keeps_the_old_folder(jsonl, tmp_path):
    rows = [json.dumps(ROWS[0])] * 100 + ['{"dim": 9, "top_values": [[{"rank": 0}]]}']  # line 101 malformed
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    with pytest.raises(FflayersError, match=r"record 101 \(dim 9\) has a malformed trigger example"):
        write_textual(bad, out, WordLevel(), progress=False)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
    write_textual(jsonl, out, WordLevel(), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FflayersError):
        write_textual(bad, out, WordLevel(), overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_killed_conversion_leaves_nothing_the_reader_takes(jsonl, tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.partial"  # what a SIGKILL leaves: the temporary folder, never ``out``
    stale.mkdir()
    (stale / "3_0.txt").write_text("junk\n")
    write_textual(jsonl, out, WordLevel(), progress=False)
    assert not stale.exists() and (out / "3_0.txt").read_text().startswith("3.14\t")
    (out / "textual.json").unlink()  # a folder of key files without its marker
    with pytest.raises(FflayersError, match="has no textual.json"):
        read_textual_dir(out)


def test_overwrite_replaces_key_files_and_keeps_others(jsonl, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "99_0.txt").write_text("1.0\tan old *key*\n")
    (out / "notes.md").write_text("mine")
    write_textual(jsonl, out, WordLevel(), overwrite=True, progress=False)
    assert not (out / "99_0.txt").exists() and (out / "notes.md").read_text() == "mine"
    assert read_marker(out)["files"] == 4 and len(read_textual_dir(out)) == 4


def test_a_malformed_line_names_its_file_and_line(jsonl, tmp_path):
    out = tmp_path / "out"
    write_textual(jsonl, out, WordLevel(), progress=False)
    with open(out / "3_0.txt", "a") as f:
        f.write("x.5\tthe *cat*\n")
    with pytest.raises(FflayersError, match=r"3_0.txt line 3: malformed trigger-example line .*'x.5' is"):
        read_textual_dir(out)
    (out / "3_0.txt").write_bytes(b"\xff\xfe\n")
    with pytest.raises(FflayersError, match="3_0.txt is not UTF-8 text"):
        read_textual_dir(out)
