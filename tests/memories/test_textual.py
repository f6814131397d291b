"""Textual trigger-example files: exact format on hand-made input, round trip, subword tokenizers, CLI."""

from __future__ import annotations

import json

import pytest

from analysis import trigger_examples_jsonl_to_textual as cli
from fflayers.core import FflayersError
from fflayers.memories.textual import (
    SubwordTokens,
    WordLevel,
    format_line,
    parse_line,
    read_textual_dir,
    write_textual,
)

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
    assert sorted(p.name for p in out.iterdir()) == ["3_0.txt", "3_1.txt", "7_0.txt", "7_1.txt"]
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
