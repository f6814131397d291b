"""Sublayer knockout against a deep copy of the model whose MLP (or attention) output weights are zero."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fflayers.core import FflayersError
from fflayers.recall.facts import KnownFact, encode_facts
from fflayers.recall.sublayer_knockout import knockout_windows, sublayer_knockout, sublayer_knockout_summary
from tests.recall.test_enrichment import independent_rate


def test_windows_are_clipped():
    assert knockout_windows(5, 2) == [(0, 2), (1, 3), (2, 4), (3, 4), (4, 4)]
    assert knockout_windows(30, 10, [0, 25]) == [(0, 10), (25, 29)]
    with pytest.raises(FflayersError, match="start layer 5 is out of range"):
        knockout_windows(5, 2, [5])


def zeroed_copy(model, kind: str, layers):
    """The model with its MLP (c_proj of mlp) or attention output projection (attn.c_proj) zeroed in
    ``layers``."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in layers:
            block = twin.transformer.h[layer]
            proj = block.mlp.c_proj if kind == "mlp" else block.attn.c_proj
            proj.weight.zero_()
            proj.bias.zero_()
    return twin


def test_knockout_equals_zeroed_weights(tiny_gpt2_dir):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from fflayers.backends.hf import load_hf_lm

    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    facts = [KnownFact(0, "Norway", "Oslo", "The capital of Norway is"),
             KnownFact(1, "Chile", "Santiago", "Chile, a long country, has its capital in")]
    encoded, _ = encode_facts(adapter, facts)
    paragraphs = ["Norway and Chile: " + " ".join(tok.decode([i]) for i in range(1000, 1400)),
                  "Chile is long. " + " ".join(tok.decode([i]) for i in range(5000, 5300))]
    table = sublayer_knockout(adapter, encoded, paragraphs, window=10, layers=[0, 1], batch_size=2)
    # none + 2 kinds x 2 starts, x 2 measured layers, x 2 facts
    assert len(table) == (1 + 2 * 2) * 2 * 2
    assert set(zip(table.start, table.end, strict=True)) == {(-1, -1), (0, 1), (1, 1)}
    for kind, start in (("none", -1), ("mlp", 0), ("attn", 0), ("mlp", 1), ("attn", 1)):
        twin = model if kind == "none" else zeroed_copy(model, kind, range(start, 2))
        for e in encoded:
            with torch.no_grad():
                p = torch.softmax(twin(torch.tensor([e.ids])).logits[0, -1], -1)[e.attribute_id].item()
            for layer in (0, 1):
                expected, _ = independent_rate(twin, tok, e.ids, e.subject_positions[-1], layer, paragraphs,
                                               e.fact.subject)
                row = table[(table.kind == kind) & (table.start == start)
                            & (table.known_id == e.fact.known_id)
                            & (table.layer == layer)].iloc[0]
                assert row.attribute_prob == pytest.approx(p, rel=1e-4, abs=1e-7), (kind, start)
                assert row.rate == pytest.approx(expected), (kind, start, layer)
                assert not math.isnan(row.rate)
    summary = sublayer_knockout_summary(table)
    assert len(summary) == 5 * 2 and set(summary.n_facts) == {2}
    # the knockout really changes things
    none = table[table.kind == "none"].attribute_prob.to_numpy()
    mlp0 = table[(table.kind == "mlp") & (table.start == 0)].attribute_prob.to_numpy()
    assert (abs(none - mlp0) / none).max() > 1e-3
    with pytest.raises(FflayersError, match="unknown knockout kind 'heads'"):
        sublayer_knockout(adapter, encoded, paragraphs, kinds=["heads"])
