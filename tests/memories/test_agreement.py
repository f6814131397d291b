"""Key-value agreement against a direct softmax over the whole vocabulary, a direct sort, and a planted
model."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.backends.hf_vocab import HFVocabulary
from fflayers.core import FflayersError
from fflayers.memories.agreement import (
    AGREEMENT_COLUMNS,
    agreement_by_layer,
    count_greater,
    key_value_agreement,
    max_probs_by_layer,
    target_id,
    targets_from_examples,
)
from fflayers.memories.textual import format_line, read_textual_dir, write_marker
from tests.fixtures.hf_models import VOCAB, tiny_model
from tests.fixtures.planted import build_planted


class WordVocabulary(HFVocabulary):
    """Word tokens ``w<id>`` for a tokenizer-less adapter, with an optional unknown-token id."""

    def __init__(self, size: int, unk: int | None) -> None:
        super().__init__(None, None, size)
        self.unk = unk

    @property
    def unk_id(self) -> int | None:
        return self.unk

    def id_to_token(self, ids):
        return [f"w{int(i)}" for i in ids]

    def token_to_id(self, token):
        return int(token[1:]) if re.fullmatch(r"w\d+", token) and int(token[1:]) < self.size else None


def word_tokens(adapter, unk=None):
    """Give a tokenizer-less adapter word tokens ``w<id>``."""
    adapter.vocab = WordVocabulary(adapter.vocab_size, unk)
    return adapter


def record_chunks(adapter):
    """Wrap project to record the number of rows of every call."""
    calls = []
    original = adapter.project

    def project(h, chunk_size=1024):
        calls.append(h.reshape(-1, h.shape[-1]).shape[0])
        return original(h, chunk_size)

    adapter.project = project
    return calls


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_model("gpt2").double()
    with torch.no_grad():  # bigger embeddings: well separated log-probs
        model.transformer.wte.weight.mul_(20)
    return model, word_tokens(HFAdapter(model, device="cpu"))


@torch.no_grad()
def direct_log_probs(model, v):
    return torch.log_softmax(model.lm_head(model.transformer.ln_f(v)), dim=-1)


def test_count_greater_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (5, 40), generator=g).double()  # many ties
    scores[0, 3] = float("nan")
    scores[1, :4] = float("-inf")
    thr = torch.randint(-1, 7, (5, 9), generator=g).double()
    thr[2, 0] = float("inf")
    thr[3, 1] = float("-inf")
    got = count_greater(scores, thr)
    want = (scores[:, None, :] > thr[:, :, None]).sum(-1)  # NaN compares False
    assert torch.equal(got, want)
    assert count_greater(scores, thr[:, :0]).shape == (5, 0)


def test_matches_direct_softmax_and_sort(gpt2):
    model, adapter = gpt2
    g = torch.Generator().manual_seed(1)
    targets = {(layer, dim): torch.randint(0, VOCAB, (int(n),), generator=g).tolist()
               for layer in range(adapter.n_layers)
               for dim, n in zip(range(0, 64, 5), torch.randint(1, 8, (13,), generator=g), strict=False)}
    # make some targets equal to the value's own top-1
    for (layer, dim), ids in list(targets.items())[::3]:
        v = adapter.ffn_values(layer)[dim].detach()
        ids[0] = int(direct_log_probs(model, v).argmax())
    calls = record_chunks(adapter)
    try:
        table = key_value_agreement(adapter, targets, layers=[2, 0], chunk_values=7)
    finally:
        del adapter.project
    assert calls and max(calls) <= 7
    assert list(table.columns) == AGREEMENT_COLUMNS
    assert list(table["layer"].unique()) == [2, 0] and len(table) == 2 * adapter.d_ff
    n_agree = 0
    for row in table.itertuples(index=False):
        v = model.transformer.h[row.layer].mlp.c_proj.weight[row.W2_dim].detach()  # Conv1D row = value
        lp = direct_log_probs(model, v)
        assert row.embedding_index == int(lp.argmax())
        assert row.max_prob == pytest.approx(float(lp.max().exp()), rel=1e-9)
        assert row.embedding_token == f"w{int(lp.argmax())}"
        tg = targets.get((row.layer, row.W2_dim), [])
        desc = lp.sort(descending=True).values
        want = [int((desc == lp[t]).nonzero()[0]) for t in tg]  # first position of its value in the sort
        assert row.target_rankings == want
        assert row.embedding_token_target_count == sum(t == row.embedding_index for t in tg)
        n_agree += row.embedding_token_target_count > 0
    assert n_agree >= 5  # the planted matches were found


def test_planted_value_agrees_with_its_triggers(tmp_path):
    planted = build_planted()
    adapter = word_tokens(planted.adapter, unk=3)
    y, x = planted.y, planted.x
    # key (LAYER, NEURON): 4 triggers, 3 of them predict Y; the top trigger (largest value, listed
    # last) predicts Y
    lines = [format_line(1.0, f"w{x}", f"w{y}"), format_line(0.5, f"w1 w{x}", "w9"),
             format_line(0.7, f"w{x}", f"w{y}"), format_line(3.0, f"w2 w{x}", f"w{y}")]
    (tmp_path / f"{planted.neuron}_{planted.layer}.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / f"0_{planted.layer}.txt").write_text(format_line(2.0, "w5", f"w{y}") + "\n" +
                                                     format_line(1.0, "w5", "nonsense") + "\n")
    write_marker(tmp_path)
    targets, n_unknown = targets_from_examples(adapter, read_textual_dir(tmp_path))
    assert n_unknown == 1
    assert targets[planted.layer, planted.neuron] == [y, y, y, 9]  # by activation, largest first
    assert targets[planted.layer, 0] == [y, 3]  # unknown -> unk id
    table = key_value_agreement(adapter, targets)
    row = table[(table["layer"] == planted.layer) & (table["W2_dim"] == planted.neuron)].iloc[0]
    assert row["embedding_index"] == y and row["embedding_token"] == f"w{y}"
    assert row["max_prob"] > 0.5
    assert row["embedding_token_target_count"] == 3
    assert row["target_rankings"][:3] == [0, 0, 0] and row["target_rankings"][3] > 0
    other = table[(table["layer"] == planted.layer) & (table["W2_dim"] == 0)].iloc[0]
    with torch.no_grad():
        lp = torch.log_softmax(planted.adapter.model.lm_head(planted.adapter.model.transformer.ln_f(
            planted.adapter.model.transformer.h[planted.layer].mlp.c_proj.weight[0])), dim=-1)
    assert other["target_rankings"][1] == int((lp > lp[3]).sum())
    summary = agreement_by_layer(table).set_index("layer")
    assert summary.loc[planted.layer, "with_triggers"] == 2
    assert summary.loc[planted.layer, "agreement_rate"] >= 0.5
    assert summary.loc[planted.layer, "top1_in_targets"] >= 0.5
    # the random baseline loses the planted agreement
    rnd = key_value_agreement(adapter, targets, random_baseline=True, seed=1)
    assert rnd[(rnd["layer"] == planted.layer)
               & (rnd["W2_dim"] == planted.neuron)].iloc[0]["embedding_token_target_count"] == 0


def test_bad_targets(gpt2):
    _, adapter = gpt2
    with pytest.raises(FflayersError, match="layer 9"):
        key_value_agreement(adapter, {(9, 0): [1]})
    with pytest.raises(FflayersError, match="dim 64"):
        key_value_agreement(adapter, {(0, 64): [1]})
    with pytest.raises(FflayersError, match="outside the vocabulary"):
        key_value_agreement(adapter, {(0, 1): [VOCAB]})


def test_target_id_spacing():
    class Spaced:  # a BPE-like vocabulary: " Paris" and "Paris" are different tokens
        entries = {" Paris": 1, "Paris": 2, "ing": 3}
        eos_id = None

        def token_to_id(self, s):
            return self.entries.get(s)

    a = Spaced()
    assert target_id(a, "Paris", after_prefix=True) == 1
    assert target_id(a, "Paris", after_prefix=False) == 2
    assert target_id(a, "ing", after_prefix=True) == 3
    assert target_id(a, "nope") is None


def test_summaries():
    table = pd.DataFrame({
        "layer": [0, 0, 0, 1, 1],
        "W2_dim": [0, 1, 2, 1, 0],
        "max_prob": [0.1, 0.2, 0.3, 0.5, 0.4],
        "embedding_index": [1, 2, 3, 4, 5],
        "embedding_token": list("abcde"),
        "embedding_token_target_count": [1, 0, 0, 2, 1],
        "target_rankings": [[3, 0], [], [4], [0, 0], "[2, 0]"],
    })
    s = agreement_by_layer(table).set_index("layer")
    assert (s.loc[0, "with_triggers"] == 2 and s.loc[0, "top1_in_targets"] == 0.5
            and s.loc[0, "agreement_rate"] == 0.0)
    assert s.loc[1, "top1_in_targets"] == 1.0 and s.loc[1, "agreement_rate"] == 0.5
    assert s.loc[1, "mean_max_prob"] == pytest.approx(0.45)
    assert max_probs_by_layer(table, 3) == [[0.1, 0.2, 0.3], [0.4, 0.5], None]
    assert np.isclose(s.loc[0, "mean_max_prob"], 0.2)
