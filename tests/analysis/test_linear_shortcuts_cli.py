"""analysis/linear_shortcuts.py end to end on a tiny GPT-2 with the real BPE vocabulary: outputs against the
library on the same positions, bad input with one line (resumed and sharded fits: test_shortcuts_runs.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

from analysis import linear_shortcuts as ls

WORDS = ("the river town bridge king castle team game season museum city village paint wheat north old young "
         "music album water moon station hour journey coach players farmers army hill").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
             for _ in range(90)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(argv, capsys):
    capsys.readouterr()
    rc = ls.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_all_then_each_subcommand(tiny_gpt2_dir, corpus, tmp_path, capsys):
    from fflayers.backends.hf import load_hf_lm
    from fflayers.shortcuts import Position, collect_states, evaluate_shortcuts, load_maps, r2_scores

    out = tmp_path / "run"
    model = ["--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet"]
    rc, stdout, err = run_cli(["all", *model, "--data_file", corpus, "--train_sentences", 60,
                               "--val_sentences", 20, "--output_dir", out, "--lambdas", 0, 0.5, 1], capsys)
    assert rc == 0, err
    for name in ("positions.parquet", "maps.safetensors", "r2.tsv", "evaluate.tsv", "early_exit.tsv",
                 "r2.png", "evaluate.pdf", "early_exit.png"):
        assert (out / name).is_file(), name
    assert not (out / "maps.safetensors.ckpt").exists()
    positions = pd.read_parquet(out / "positions.parquet")
    assert (positions.split == "train").sum() == 60 and (positions.split == "val").sum() == 20
    # the tables equal the library on the validation positions written to positions.parquet
    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    val = positions[positions.split == "val"]
    pos = [Position(int(r.sentence_index), int(r.position), tuple(r.input_ids), int(r.position))
           for r in val.itertuples(index=False)]
    for p in pos:  # causal: the input is the prefix that ends at the position
        assert len(p.input_ids) == p.position + 1
    states = collect_states(adapter, pos)
    maps, meta = load_maps(out / "maps.safetensors", adapter)
    assert len(maps) == 3 * 2 // 2 and meta["positions"] == "60"
    r2 = pd.read_csv(out / "r2.tsv", sep="\t")
    expected = r2_scores(states, maps)
    assert r2["r2"].tolist() == pytest.approx(expected["r2"].tolist(), rel=1e-6, abs=1e-9)
    ev = pd.read_csv(out / "evaluate.tsv", sep="\t")
    assert ev["precision@1"].tolist() == pytest.approx(
        evaluate_shortcuts(adapter, states, maps)["precision@1"].tolist())
    ee = pd.read_csv(out / "early_exit.tsv", sep="\t")
    # lambda 1 asks for p1 - p2 > 0.9: the random tiny model is never that sure, so it is the full model
    assert (ee[ee["lambda"] == 1]["precision@1"] == 1.0).all()

    for sub in ("r2", "evaluate", "early-exit"):
        rc, _, err = run_cli([sub, *model, "--output_dir", out], capsys)
        assert rc == 0, err
    rc, stdout, err = run_cli(["plot", "--output_dir", out], capsys)
    assert rc == 0 and "6 figure files" in stdout, err

    # submodules: maps inside each block, their r^2 and the five shortcuts, against the library
    from fflayers.shortcuts.submodules import evaluate_submodule_shortcuts, load_submodule_maps

    rc, stdout, err = run_cli(["submodules", *model, "--output_dir", out, "--eval_positions", 8], capsys)
    assert rc == 0, err
    sub_maps, meta = load_submodule_maps(out / "submodule_maps.safetensors", adapter)
    assert meta["layout"] == "pre_norm" and len(sub_maps) == 2 * 6
    sr2 = pd.read_csv(out / "submodule_r2.tsv", sep="\t")
    assert set(sr2.submodule) == {"ln1", "attn", "res1", "ln2", "mlp", "res2"} and len(sr2) == 2 * 6 * 2
    sev = pd.read_csv(out / "submodule_evaluate.tsv", sep="\t")
    assert set(sev.mapping) == {"id", "mat", "mat_attn", "mat_ffn", "mat_ln1_ln2"}
    want = evaluate_submodule_shortcuts(adapter, pos[:8], sub_maps)
    got = sev[sev.mapping.str.startswith("mat_")].sort_values(["layer", "mapping"])
    assert got["precision@1"].tolist() == pytest.approx(
        want.sort_values(["layer", "mapping"])["precision@1"].tolist())
    for name in ("submodule_r2.png", "submodule_evaluate.pdf"):
        assert (out / name).is_file(), name


def test_bad_input(tiny_gpt2_dir, corpus, tmp_path, capsys):
    model = ["--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet"]
    cases = {
        "no fit yet": (["r2", *model, "--output_dir", tmp_path / "none"], "run `linear_shortcuts.py fit`"),
        "negative ridge": (["fit", *model, "--data_file", corpus, "--ridge", -1, "--output_dir",
                            tmp_path / "a"],
                           "--ridge"),
        "missing corpus": (["fit", *model, "--data_file", tmp_path / "x.txt", "--output_dir", tmp_path / "b"],
                           "does not exist"),
        "underdetermined": (["fit", *model, "--data_file", corpus, "--train_sentences", 5, "--val_sentences",
                             2, "--output_dir", tmp_path / "c"], "underdetermined"),
        "unwritable": (["fit", *model, "--data_file", corpus, "--output_dir", "/proc/shortcuts"], "/proc"),
        "no block size": (["fit", *model, "--data_file", corpus, "--shard_positions", 0, "--output_dir",
                           tmp_path / "d"], "--shard_positions 0 must be >= 1"),
        "plot without tables": (["plot", "--output_dir", tmp_path], "no r2.tsv"),
        "no positions per sentence": (["fit", *model, "--data_file", corpus, "--positions_per_sentence", 0,
                                       "--output_dir", tmp_path / "e"], "--positions_per_sentence 0 must be"),
    }
    for name, (argv, needle) in cases.items():
        rc, _, err = run_cli(argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (name, err)
    for name in "abcd":  # refused before the pass (underdetermined: from the positions): nothing left behind
        assert not (tmp_path / name).exists(), name


def test_fit_on_every_position_of_a_few_sentences(tiny_gpt2_dir, corpus, tmp_path, capsys):
    """``--positions all``: every token of 12 training sentences (each position read from one forward pass of
    its sentence); the maps equal numpy least squares on the states of each position's own prefix."""
    import numpy as np

    from fflayers.backends.hf import load_hf_lm
    from fflayers.shortcuts import Position, collect_states, load_maps
    from fflayers.shortcuts.positions import corpus_sentences

    out = tmp_path / "all"
    rc, _, err = run_cli(["fit", "--hf_model", tiny_gpt2_dir, "--device", "cpu", "--quiet", "--data_file",
                          corpus, "--train_sentences", 12, "--val_sentences", 4, "--positions", "all",
                          "--output_dir", out], capsys)
    assert rc == 0, err
    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    train_ids, _ = corpus_sentences(adapter, str(corpus), 12, 4, 0)
    table = pd.read_parquet(out / "positions.parquet")
    train = table[table.split == "train"]
    assert len(train) == sum(len(s) for s in train_ids) > 100  # more positions than d = 32 from 12 sentences
    assert (table.split == "val").sum() == 4                     # validation: one random position each
    prefixes = [Position(int(r.sentence_index), int(r.position), tuple(r.input_ids[: r.position + 1]),
                         int(r.position)) for r in train.itertuples(index=False)]
    for p, ids in zip(prefixes, (train_ids[p.sentence_index] for p in prefixes), strict=True):
        assert p.input_ids == tuple(ids[: p.position + 1])
    states = collect_states(adapter, prefixes).double().numpy()
    maps, meta = load_maps(out / "maps.safetensors", adapter)
    assert meta["positions"] == str(len(train))
    for (j, i), A in maps.items():
        want = np.linalg.lstsq(states[:, i], states[:, j], rcond=None)[0].T
        np.testing.assert_allclose(A.double().numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
