"""value_predictions / random_baseline against a direct softmax of the head applied to each value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.memories.value_projections import random_baseline, random_values, value_predictions
from tests.fixtures.hf_models import tiny_model
from tests.fixtures.planted import build_planted
from tests.memories.test_agreement import record_chunks, word_tokens


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama").double()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
        model.lm_head.weight.mul_(20)
    return model, word_tokens(HFAdapter(model, device="cpu"))


@torch.no_grad()
def direct(model, layer, dim):
    v = model.model.layers[layer].mlp.down_proj.weight[:, dim]  # column of the down projection
    return torch.log_softmax(model.lm_head(model.model.norm(v)), dim=-1)


def test_value_predictions_match_direct(llama):
    model, adapter = llama
    calls = record_chunks(adapter)
    try:
        df = value_predictions(adapter, layers=[1, 2], top_k=5, chunk_values=9)
    finally:
        del adapter.project
    assert max(calls) <= 9
    assert len(df) == 2 * adapter.d_ff and list(df["layer"].unique()) == [1, 2]
    for row in df.itertuples(index=False):
        lp = direct(model, row.layer, row.dim)
        top = lp.topk(5)
        assert row.top1_id == int(top.indices[0]) and row.top1_token == f"w{int(top.indices[0])}"
        # LlamaRMSNorm computes in float32
        assert row.max_prob == pytest.approx(float(top.values[0].exp()), rel=1e-6)
        np.testing.assert_array_equal(row.topk_ids, top.indices.numpy())
        np.testing.assert_allclose(row.topk_probs, top.values.exp().numpy(), rtol=1e-6)
        assert np.all(np.diff(row.topk_probs) <= 0)


def test_planted_value_predicts_y():
    planted = build_planted()
    adapter = word_tokens(planted.adapter)
    df = value_predictions(adapter, layers=[planted.layer], top_k=3)
    row = df[df["dim"] == planted.neuron].iloc[0]
    assert row["top1_id"] == planted.y and row["max_prob"] > 0.5


def test_random_baseline(llama):
    model, adapter = llama
    rv = random_values(adapter, 1, seed=4)
    values = adapter.ffn_values(1).detach()
    torch.testing.assert_close(rv.norm(dim=1), values.norm(dim=1))
    cos = torch.nn.functional.cosine_similarity(rv, values, dim=1)
    assert cos.abs().max() < 0.9  # new directions
    assert (torch.equal(rv, random_values(adapter, 1, seed=4))
            and not torch.equal(rv, random_values(adapter, 1, seed=5)))
    df = random_baseline(adapter, layers=[1], top_k=2, seed=4)
    for row in df.itertuples(index=False):
        with torch.no_grad():
            lp = torch.log_softmax(model.lm_head(model.model.norm(rv[row.dim])), dim=-1)
        assert row.top1_id == int(lp.argmax())
        # LlamaRMSNorm computes in float32
        assert row.max_prob == pytest.approx(float(lp.max().exp()), rel=1e-6)


def test_bad_input(llama):
    _, adapter = llama
    with pytest.raises(FflayersError, match="top_k"):
        value_predictions(adapter, top_k=0)
    with pytest.raises(FflayersError, match="out of range"):
        value_predictions(adapter, layers=[5])
