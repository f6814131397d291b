"""Attention weights and output embeddings: backend-specific checks against the models' own computations.

The contract of every backend (q/k/v and full attention from ``attention_weights``, logits from
``output_embeddings``) is checked in test_contract.py; here: the BERT encoder without MLM head, the
grouped-query and fused layouts spot-checked against raw parameters, the adaptive softmax's bands against its
modules.
"""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.base import AttentionWeights
from fflayers.backends.hf import HFAdapter
from fflayers.core import ModelError
from fflayers.hooks import capture
from tests.fixtures.hf_models import HEADS, VOCAB, tiny_config, tiny_model

TOL = {"atol": 1e-5, "rtol": 1e-4}

def with_random_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves biases at zero; perturb them so that the checks see every bias."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make_hf(name: str) -> HFAdapter:
    """Tiny HF adapter with non-zero biases; ``bert_encoder`` is a BertModel without MLM head."""
    if name == "bert_encoder":
        import transformers as tf

        torch.manual_seed(0)
        model = tf.BertModel(tiny_config("bert")).eval()
    else:
        model = tiny_model(name)
    return HFAdapter(with_random_biases(model), device="cpu")


def single_token_attn_out(w: AttentionWeights, x: torch.Tensor) -> torch.Tensor:
    """Attention output when each position sees only itself (weight 1): sum_h v_{kv(h)} @ W_O[h] + b_O."""
    out = torch.zeros(*x.shape[:-1], w.W_O.shape[-1])
    for h in range(w.n_heads):
        g = w.kv_head(h)
        v = x @ w.W_V[g] + (0 if w.b_V is None else w.b_V[g])
        out = out + v @ w.W_O[h]
    return out + (0 if w.b_O is None else w.b_O)


def token_batch(B: int = 3, T: int = 1, seed: int = 0, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, high, (B, T), generator=torch.Generator().manual_seed(seed))


# ----- HF ------------------------------------------------------------------------------------------------


def test_bert_encoder_single_token_attn_out_from_weights():
    """BertModel without MLM head (the encoder spec): each position alone reads its own value, so attn_out =
    sum_h v_h W_O[h] + b_O from ``attention_weights`` on resid_pre (post-LN: the attention reads it)."""
    adapter = make_hf("bert_encoder")
    ids = token_batch()
    with capture(adapter, ["resid_pre", "attn_out"]) as c, torch.no_grad():
        adapter.run(ids)
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            w = adapter.attention_weights(layer)
            x = c["resid_pre", layer]
            torch.testing.assert_close(single_token_attn_out(w, x), c["attn_out", layer], **TOL)


def test_llama_grouped_query_heads():
    """Grouped-query heads: 4 query heads share 2 key/value heads; W_K[1] is k_proj's second half of rows."""
    adapter = make_hf("llama")
    w = adapter.attention_weights(0)
    assert (w.n_heads, w.n_kv_heads) == (4, 2)
    assert w.W_K.shape[0] == w.W_V.shape[0] == 2
    assert [w.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert w.kv_head(3) == 1
    # the tiny config's k_proj holds 2 heads of d_head features: head 1 is its second half of output rows
    k_proj = adapter.blocks[0].self_attn.k_proj.weight
    torch.testing.assert_close(w.W_K[1], k_proj[w.d_head:].T)


def test_gpt2_attention_weights_match_fused_parameters():
    """Spot check of the layout against the raw Conv1D parameters ([in, out], q|k|v on the out side)."""
    adapter = make_hf("gpt2")
    attn = adapter.blocks[1].attn
    w = adapter.attention_weights(1)
    d, dh = adapter.d_model, w.d_head
    torch.testing.assert_close(w.W_K[2], attn.c_attn.weight[:, d + 2 * dh : d + 3 * dh])
    torch.testing.assert_close(w.b_V[3], attn.c_attn.bias[2 * d + 3 * dh : 2 * d + 4 * dh])
    torch.testing.assert_close(w.W_O[1], attn.c_proj.weight[dh : 2 * dh])


def test_bert_encoder_has_no_output_embeddings():
    """An encoder without MLM head has no output embeddings (one error), but its attention weights."""
    adapter = make_hf("bert_encoder")
    with pytest.raises(ModelError, match="no output head"):
        adapter.output_embeddings()
    assert adapter.output_embeddings_kind.startswith("none")
    assert adapter.attention_weights(0).n_heads == HEADS  # its attention is still readable


# ----- fairseq -------------------------------------------------------------------------------------------


def test_fairseq_adaptive_output_embeddings_per_band(fairseq_adapters):
    """Adaptive softmax: h @ E[band].T vs the head module's word scores and each tail module's output."""
    adapter = fairseq_adapters("fairseq_adaptive_lm")
    dec = adapter.decoder
    asm = dec.adaptive_softmax
    assert asm is not None and len(asm.tail) >= 2
    assert adapter.output_embeddings_kind == "adaptive softmax: head rows + tail projections"
    E = adapter.output_embeddings()
    assert E.shape == (adapter.vocab_size, adapter.d_model)
    cutoff = list(asm.cutoff)
    assert cutoff[-1] == adapter.vocab_size
    h = torch.randn(6, adapter.d_model, generator=torch.Generator().manual_seed(10))
    asm.eval()
    with torch.no_grad():
        x = h if dec.project_out_dim is None else dec.project_out_dim(h)
        head = asm.head(x)
        assert head.shape[-1] == cutoff[0] + len(asm.tail)
        torch.testing.assert_close(h @ E[: cutoff[0]].T, head[:, : cutoff[0]], **TOL)
        for i, tail in enumerate(asm.tail):
            band = E[cutoff[i] : cutoff[i + 1]]
            torch.testing.assert_close(h @ band.T, tail(x), **TOL)
