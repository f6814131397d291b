"""Keys / values / heads in embedding space against explicit matrix products on tiny models of every
architecture (GQA included) and the adaptive-softmax fairseq LM; the hidden-state comparison against a
recomputation with plain torch hooks."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.embedding_space import (
    PairFilter,
    case_space_groups,
    embedding_matrix,
    head_pairs,
    neuron_tokens,
    token_mask,
)
from fflayers.embedding_space.neurons_vs_hidden import neurons_vs_hidden, overlap_by_layer
from tests.fixtures.hf_models import HF_ARCHS, tiny_model


class _Tokens:
    """Token strings for tokenizer-less tiny models: ids as text, some upper-case and spaced variants."""

    def __init__(self, adapter):
        self.adapter = adapter

    def __call__(self, ids):
        return [(" " if i % 3 == 0 else "") + (f"T{i % 20}" if i % 2 else f"t{i % 20}") for i in ids]


def tiny(arch: str) -> HFAdapter:
    adapter = HFAdapter(tiny_model(arch), device="cpu")
    adapter.vocab.id_to_token = _Tokens(adapter)
    return adapter


def dense_top(M: torch.Tensor, n: int, largest: bool = True):
    vals, idx = M.reshape(-1).topk(n, largest=largest)
    return vals, idx // M.shape[1], idx % M.shape[1]


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_value_and_key_tokens_equal_explicit_products(arch):
    adapter = tiny(arch)
    E = embedding_matrix(adapter)
    # the explicit E: the model's own output embedding (BERT: the MLM decoder)
    head = adapter.model.cls.predictions.decoder if arch == "bert" else adapter.model.get_output_embeddings()
    torch.testing.assert_close(E.matrix, head.weight.detach())
    table = neuron_tokens(adapter, E, layers=[1], k=5, neurons=[0, 7])
    for side, vectors in (("key", adapter.ffn_keys(1)), ("value", adapter.ffn_values(1))):
        for neuron in (0, 7):
            scores = vectors[neuron].detach() @ head.weight.detach().T
            rows = table[(table.side == side) & (table.neuron == neuron)].sort_values("rank")
            top = scores.topk(5)
            assert rows.token_id.tolist() == top.indices.tolist()
            torch.testing.assert_close(torch.tensor(rows.score.tolist(), dtype=torch.float64),
                                       top.values.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", HF_ARCHS)
@pytest.mark.parametrize("kind", ["qk", "ov"])
def test_head_pairs_equal_dense_matrix(arch, kind):
    adapter = tiny(arch)
    E = embedding_matrix(adapter).matrix.float()
    aw = adapter.attention_weights(2)
    head = aw.n_heads - 1
    g = aw.kv_head(head)
    W = aw.W_Q[head] @ aw.W_K[g].T if kind == "qk" else aw.W_V[g] @ aw.W_O[head]
    M = E @ W.float() @ E.T
    for largest in (True, False):
        table = head_pairs(adapter, embedding_matrix(adapter), 2, head, kind, n=20, largest=largest,
                           block_rows=13)
        vals, rows, cols = dense_top(M, 20, largest)
        assert table.row_token_id.tolist() == rows.tolist() and table.col_token_id.tolist() == cols.tolist()
        torch.testing.assert_close(torch.tensor(table.score.tolist(), dtype=torch.float64), vals.double(),
                                   rtol=1e-4, atol=1e-5)
        assert set(table.kv_head) == {g}


def test_grouped_query_head_uses_its_group():
    adapter = tiny("llama")  # 4 query heads, 2 key/value heads
    table = head_pairs(adapter, embedding_matrix(adapter), 0, 3, "ov", n=5)
    assert set(table.kv_head) == {1}
    aw = adapter.attention_weights(0)
    E = embedding_matrix(adapter).matrix.float()
    _, rows, cols = dense_top(E @ (aw.W_V[1] @ aw.W_O[3]).float() @ E.T, 5)
    assert table.row_token_id.tolist() == rows.tolist() and table.col_token_id.tolist() == cols.tolist()


def test_filters_on_head_pairs():
    adapter = tiny("gpt2")
    tokens = adapter.vocab.id_to_token(range(adapter.vocab_size))
    mask = token_mask(tokens, ascii_only=True, alnum_only=True)
    groups = case_space_groups(tokens)
    filt = PairFilter(rows=mask, cols=mask, exclude_same=True, groups=groups)
    table = head_pairs(adapter, embedding_matrix(adapter), 0, 0, "qk", n=30, filt=filt)
    assert len(table) == 30
    for r, c in zip(table.row_token, table.col_token, strict=True):
        assert r.strip().lower() != c.strip().lower()  # also excludes the same token


def test_fairseq_adaptive_value_tokens_use_the_heads_vectors(fairseq_adaptive_lm):
    from fflayers.backends.fairseq_loading import load_fairseq_lm

    adapter = load_fairseq_lm(fairseq_adaptive_lm.model_dir, device="cpu")
    E = embedding_matrix(adapter)
    assert "adaptive" in E.kind
    table = neuron_tokens(adapter, E, layers=[0], sides=["value"], k=3, neurons=[4])
    scores = adapter.ffn_values(0)[4].detach() @ adapter.output_embeddings().detach().T
    assert table.token_id.tolist() == scores.topk(3).indices.tolist()


def test_bad_input():
    adapter = tiny("gpt2")
    E = embedding_matrix(adapter)
    with pytest.raises(FflayersError, match="head 9 is out of range"):
        head_pairs(adapter, E, 0, 9, "qk")
    with pytest.raises(FflayersError, match="layer"):
        head_pairs(adapter, E, 7, 0, "qk")
    with pytest.raises(FflayersError, match="neuron 999 is out of range"):
        neuron_tokens(adapter, E, layers=[0], neurons=[999])
    with pytest.raises(FflayersError, match="larger than"):
        head_pairs(adapter, E, 0, 0, "ov", n=adapter.vocab_size**2 + 1)


def test_neurons_vs_hidden_equals_recomputation():
    """Recompute with plain forward hooks on the GPT-2 modules (no fflayers hooks) and explicit products."""
    adapter = tiny("gpt2")
    E = embedding_matrix(adapter)
    g = torch.Generator().manual_seed(3)
    sentences = [torch.randint(0, adapter.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 3)]
    table = neurons_vs_hidden(adapter, E, sentences, k=4, n_neurons=3, seed=1)
    model = adapter.model
    for row in table.itertuples(index=False):
        seq, layer, pos = sentences[row.sentence], row.layer, row.position
        seen = {}
        block = model.transformer.h[layer]
        hs = [block.register_forward_hook(
                  lambda _m, _a, out, seen=seen: seen.__setitem__(
                      "h", out[0] if isinstance(out, tuple) else out)),
              block.mlp.c_proj.register_forward_pre_hook(
                  lambda _m, args, seen=seen: seen.__setitem__("m", args[0]))]
        with torch.no_grad():
            model(input_ids=torch.tensor([seq]))
        for h in hs:
            h.remove()
        h, m = seen["h"][0, pos], seen["m"][0, pos]
        with torch.no_grad():
            logits = model.lm_head(model.transformer.ln_f(h))
        hidden = set(logits.topk(4).indices.tolist())
        V = block.mlp.c_proj.weight.detach()  # Conv1D [d_ff, d]: row i is value i
        active = (m.abs() * V.norm(dim=1)).topk(3).indices
        tokens = set(((V[active] * torch.sign(m[active])[:, None]) @ E.matrix.T)
                     .topk(4, dim=1).indices.reshape(-1).tolist())
        assert row.overlap_active == pytest.approx(len(hidden & tokens) / 4)
        assert 0 <= row.overlap_random <= 1
    summary = overlap_by_layer(table)
    assert summary.layer.tolist() == [0, 1, 2] and (summary.positions == 3).all()
