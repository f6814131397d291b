"""analysis/key_value_agreement.py end to end on the tiny adaptive-softmax fairseq LM, checked against
fairseq's own output layer (``get_normalized_probs``) and a direct sort; bad inputs exit 2 with one line and
no files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import key_value_agreement as kva
from fflayers.backends.fairseq_loading import load_fairseq_lm
from fflayers.memories.agreement import AGREEMENT_COLUMNS
from fflayers.memories.textual import format_line, write_marker

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = kva.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def setup(fairseq_adaptive_lm, tmp_path_factory):
    """Textual trigger files for a few keys; targets are dictionary words, one unknown word and ``</s>``."""
    adapter = load_fairseq_lm(fairseq_adaptive_lm.model_dir, device="cpu")
    words = [adapter.dictionary[i] for i in range(adapter.dictionary.nspecial, len(adapter.dictionary))]
    data = tmp_path_factory.mktemp("textual")
    keys = {(0, 3): ["the", "city", "and", "the"], (1, 10): ["river", "qqqnotaword", "</s>"],
            (1, 255): words[:40]}
    # the value's own top-1 as a target of key (1, 7), so that the count is exercised
    with torch.no_grad():
        lp = adapter.model.get_normalized_probs((adapter.layers[1].fc2.weight[:, 7][None, None], None),
                                                log_probs=True)
    keys[1, 7] = [adapter.dictionary[int(lp[0, 0].argmax())], "the"]
    for (layer, dim), targets in keys.items():
        lines = [format_line(10.0 - j, f"w{j} prefix", t) for j, t in enumerate(targets)]
        (data / f"{dim}_{layer}.txt").write_text("\n".join(lines) + "\n")
    (data / "notes.md").write_text("not a trigger file\n")
    write_marker(data, adapter.vocab)
    return adapter, data, keys, fairseq_adaptive_lm.model_dir


def direct(adapter, layer, dim):
    with torch.no_grad():
        v = adapter.layers[layer].fc2.weight[:, dim]
        return adapter.model.get_normalized_probs((v[None, None], None), log_probs=True)[0, 0]


def test_end_to_end(setup, tmp_path, capsys):
    adapter, data, keys, model_dir = setup
    base = tmp_path / "out" / "kv"
    base.parent.mkdir()
    rc, out, err = run_cli(["--model_dir", model_dir, "--data_dir", data, "--output_base", base, "--device",
                            "cpu", "--chunk_values", 50, "--random_baseline", "--quiet"], capsys)
    assert rc == 0, err
    assert "1 not in the vocabulary" in out
    table = pd.read_csv(f"{base}.tsv", sep="\t", keep_default_na=False)
    assert list(table.columns) == AGREEMENT_COLUMNS
    assert len(table) == adapter.n_layers * adapter.d_ff
    max_probs = json.loads(Path(f"{base}_max_probs.json").read_text())
    assert len(max_probs) == adapter.n_layers and all(len(row) == adapter.d_ff for row in max_probs)
    d = adapter.dictionary
    for row in table.itertuples(index=False):
        if row.W2_dim % 37 and (row.layer, row.W2_dim) not in keys:
            continue
        lp = direct(adapter, row.layer, row.W2_dim)
        # float32 head: batched and single-row runs may differ in the last bits, so near-ties (TOL) go
        # either way
        assert lp[row.embedding_index] >= lp.max() - TOL and row.embedding_token == d[row.embedding_index]
        assert row.max_prob == pytest.approx(float(lp.max().exp()), rel=1e-5)
        assert max_probs[row.layer][row.W2_dim] == pytest.approx(row.max_prob, rel=1e-9)
        targets = [d.index(t) for t in keys.get((row.layer, row.W2_dim), [])]  # unknown -> <unk>
        desc = lp.sort(descending=True).values
        ranks = json.loads(row.target_rankings)
        assert len(ranks) == len(targets)
        for rank, t in zip(ranks, targets, strict=True):
            lo, hi = int((desc > lp[t] + TOL).sum()), int((desc > lp[t] - TOL).sum()) - 1
            assert lo <= rank <= hi, (rank, lo, hi)
        assert row.embedding_token_target_count == sum(t == row.embedding_index for t in targets)
    assert table.set_index(["layer", "W2_dim"]).loc[(1, 7), "embedding_token_target_count"] >= 1
    rnd = pd.read_csv(f"{base}_random.tsv", sep="\t", keep_default_na=False)
    assert len(rnd) == len(table) and not (rnd["max_prob"].to_numpy() == table["max_prob"].to_numpy()).all()
    assert json.loads(Path(f"{base}.meta.json").read_text())["config"]["keys"] == len(keys)


def test_layers_subset(setup, tmp_path, capsys):
    adapter, data, _, model_dir = setup
    base = tmp_path / "kv"
    rc, _, err = run_cli(["--model_dir", model_dir, "--data_dir", data, "--output_base", base,
                          "--device", "cpu", "--layers", "-1", "--quiet"], capsys)
    assert rc == 0, err
    table = pd.read_csv(f"{base}.tsv", sep="\t", keep_default_na=False)
    assert set(table["layer"]) == {1} and len(table) == adapter.d_ff
    max_probs = json.loads(Path(f"{base}_max_probs.json").read_text())
    assert max_probs[0] is None and len(max_probs[1]) == adapter.d_ff


def _bad_cases(tmp: Path, data: Path, model_dir: Path):
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    bad_layer = tmp / "bad_layer"
    bad_layer.mkdir()
    (bad_layer / "0_5.txt").write_text(format_line(1.0, "a", "the") + "\n")
    write_marker(empty)
    write_marker(bad_layer)
    # a conversion killed midway: key files, no marker
    unfinished = tmp / "unfinished"
    shutil.copytree(data, unfinished)
    (unfinished / "textual.json").unlink()
    # files lost after the conversion finished
    short = tmp / "short"
    shutil.copytree(data, short)
    (short / "3_0.txt").unlink()
    # made with another vocabulary (the marker of a 5-token one)
    other = tmp / "other_vocab"
    shutil.copytree(data, other)
    marker = json.loads((other / "textual.json").read_text())
    marker["vocabulary"] = {"size": 5, "sha256": "0" * 64}
    (other / "textual.json").write_text(json.dumps(marker))
    a_file = tmp / "a_file"
    a_file.write_text("x")
    out = tmp / "out" / "kv"
    common = ["--model_dir", model_dir, "--device", "cpu"]
    return {
        "missing data_dir": ([*common, "--data_dir", tmp / "nope", "--output_base", out], "does not exist"),
        "empty data_dir": ([*common, "--data_dir", empty, "--output_base", out], "no {dim}_{layer}.txt"),
        "missing output folder": ([*common, "--data_dir", data, "--output_base", tmp / "nodir" / "kv"],
                                  "does not exist"),
        "output parent is a file": ([*common, "--data_dir", data, "--output_base", a_file / "kv"],
                                    "output folder"),
        "layer out of range": ([*common, "--data_dir", data, "--output_base", out, "--layers", "7"],
                               "out of range"),
        "trigger layer not in model": ([*common, "--data_dir", bad_layer, "--output_base", out], "layer 5"),
        "unfinished conversion": ([*common, "--data_dir", unfinished, "--output_base", out],
                                  "has no textual.json: it was left by an interrupted conversion"),
        "key files missing": ([*common, "--data_dir", short, "--output_base", out],
                              "holds 3 key files, its textual.json says 4"),
        "another vocabulary": ([*common, "--data_dir", other, "--output_base", out],
                               "was made with another vocabulary (5 tokens)"),
        "two models": ([*common, "--hf_model", "x", "--data_dir", data, "--output_base", out], "exactly one"),
        "no model": (["--data_dir", data, "--output_base", out], "exactly one"),
        "bad flag": ([*common, "--data_dir", data, "--output_base", out, "--frobnicate"], "unrecognized"),
        "bad model dir": (["--model_dir", tmp / "nomodel", "--data_dir", data, "--output_base", out],
                          "does not exist"),
        "output folder refuses files": (["--model_dir", model_dir, "--data_dir", data, "--output_base",
                                         "/proc/kv"],
                                        "cannot write in folder /proc"),
    }


CASES = ["missing data_dir", "empty data_dir", "missing output folder", "output parent is a file",
         "layer out of range", "trigger layer not in model", "unfinished conversion", "key files missing",
         "another vocabulary", "two models", "no model", "bad flag",
         "bad model dir", "output folder refuses files"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_one_line_no_files(case, setup, tmp_path, capsys):
    _, data, _, model_dir = setup
    (tmp_path / "out").mkdir()
    argv, needle = _bad_cases(tmp_path, data, model_dir)[case]
    before = set(tmp_path.rglob("*"))
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert set(tmp_path.rglob("*")) == before  # nothing written


def test_script_exit_code(setup, tmp_path):
    model_dir = setup[3]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "analysis" / "key_value_agreement.py"), "--model_dir",
                           str(model_dir), "--data_dir", str(tmp_path / "missing"), "--output_base",
                           str(tmp_path / "kv")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_tsv_keeps_one_line_per_value_with_control_characters_in_tokens():
    import io

    import pandas as pd

    from analysis.key_value_agreement import to_tsv_frame

    table = pd.DataFrame({"layer": [0, 0, 1], "embedding_token": ["a\rb", "\n", "e\tf"],
                          "target_rankings": [[1, 0], [], [3]]})
    buf = io.StringIO()
    to_tsv_frame(table).to_csv(buf, sep="\t", index=False)
    assert buf.getvalue().count("\n") == 4  # header + 3 rows
    back = pd.read_csv(io.StringIO(buf.getvalue()), sep="\t", keep_default_na=False)
    assert back["embedding_token"].tolist() == ["a\\rb", "\\n", "e\\tf"]
    assert back["target_rankings"].tolist() == ["[1, 0]", "[]", "[3]"]
