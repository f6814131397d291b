"""Attention weights and output embeddings, checked against the models' own computations.

Every expected value here is computed from the model's modules (forward hooks, logits, direct calls), with
head layouts written out independently of the adapters.
"""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.base import AdapterError, AttentionWeights
from fflayers.backends.fairseq_lm import FairseqLMAdapter
from fflayers.backends.hf import HFAdapter
from fflayers.hooks import capture
from tests.fixtures.hf_models import HEADS, HF_ARCHS, LAYERS, VOCAB, tiny_config, tiny_model

TOL = {"atol": 1e-5, "rtol": 1e-4}
FAIRSEQ_MODELS = ["fairseq_plain_lm", "fairseq_adaptive_lm"]

#: the norm each HF block applies to the stream before its attention (None: post-LN, attention reads resid_pre)
FIRST_NORM = {"gpt2": "ln_1", "gpt_neo": "ln_1", "gptj": "ln_1", "gpt_neox": "input_layernorm",
              "llama": "input_layernorm", "bert": None}
#: the norm before the LM head (model-relative)
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neo": "transformer.ln_f", "gptj": "transformer.ln_f",
              "gpt_neox": "gpt_neox.final_layer_norm", "llama": "model.norm"}
#: q/k/v projection modules (block-relative): three modules, or one fused module with its layout
QKV_MODULES = {
    "gpt2": ("attn.c_attn", "q|k|v"),
    "gpt_neo": (("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"), None),
    "gptj": (("attn.q_proj", "attn.k_proj", "attn.v_proj"), None),
    "gpt_neox": ("attention.query_key_value", "per-head"),
    "llama": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), None),
    "bert": (("attention.self.query", "attention.self.key", "attention.self.value"), None),
}


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


def hf_attn_input(adapter: HFAdapter, layer: int, resid_pre: torch.Tensor) -> torch.Tensor:
    norm = FIRST_NORM[adapter.family]
    return resid_pre if norm is None else adapter.blocks[layer].get_submodule(norm)(resid_pre)


def fairseq_attn_input(adapter: FairseqLMAdapter, layer: int, resid_pre: torch.Tensor) -> torch.Tensor:
    block = adapter.layers[layer]
    return block.self_attn_layer_norm(resid_pre) if block.normalize_before else resid_pre


def single_token_attn_out(w: AttentionWeights, x: torch.Tensor) -> torch.Tensor:
    """Attention output when each position sees only itself (weight 1): sum_h v_{kv(h)} @ W_O[h] + b_O."""
    out = torch.zeros(*x.shape[:-1], w.W_O.shape[-1])
    for h in range(w.n_heads):
        g = w.kv_head(h)
        v = x @ w.W_V[g] + (0 if w.b_V is None else w.b_V[g])
        out = out + v @ w.W_O[h]
    return out + (0 if w.b_O is None else w.b_O)


def per_head(w: AttentionWeights, x: torch.Tensor, which: str) -> torch.Tensor:
    """``[..., n, d_head]``: x @ W[h] + b[h] for every head of q, k or v."""
    W, b = getattr(w, f"W_{which}"), getattr(w, f"b_{which}")
    out = torch.stack([x @ W[i] for i in range(W.shape[0])], dim=-2)
    return out if b is None else out + b


def token_batch(B: int = 3, T: int = 1, seed: int = 0, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, high, (B, T), generator=torch.Generator().manual_seed(seed))


# ----- HF: attention weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*HF_ARCHS, "bert_encoder"])
def test_hf_single_token_attn_out_from_weights(name):
    adapter = make_hf(name)
    ids = token_batch()
    with capture(adapter, ["resid_pre", "attn_out"]) as c, torch.no_grad():
        adapter.run(ids)
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            w = adapter.attention_weights(layer)
            x = hf_attn_input(adapter, layer, c["resid_pre", layer])
            torch.testing.assert_close(single_token_attn_out(w, x), c["attn_out", layer], **TOL)


def split_fused(out: torch.Tensor, layout: str, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, T, H, d_head]`` from a fused projection output ``[B, T, 3 * H * d_head]``."""
    B, T, F = out.shape
    if layout == "q|k|v":  # GPT-2: three d-wide blocks, each head-major
        return tuple(part.reshape(B, T, n_heads, -1) for part in out.split(F // 3, dim=-1))
    if layout == "per-head":  # GPT-NeoX: [H, 3 * d_head], q / k / v thirds per head
        return out.reshape(B, T, n_heads, -1).chunk(3, dim=-1)
    raise AssertionError(layout)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_qkv_match_projection_modules(arch):
    adapter = make_hf(arch)
    ids = token_batch(B=2, T=7, seed=3)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 5:] = False
    modules, layout = QKV_MODULES[arch]
    names = (modules,) if layout else modules
    seen: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for layer in range(adapter.n_layers):
        for name in names:
            def keep(_m, args, output, key=(layer, name)):
                seen[key] = (args[0], output)

            handles.append(adapter.blocks[layer].get_submodule(name).register_forward_hook(keep))
    try:
        with capture(adapter, ["resid_pre"]) as c, torch.no_grad():
            adapter.run(ids, mask)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            w = adapter.attention_weights(layer)
            x = seen[layer, names[0]][0]
            torch.testing.assert_close(x, hf_attn_input(adapter, layer, c["resid_pre", layer]), **TOL)
            if layout:
                q, k, v = split_fused(seen[layer, modules][1], layout, HEADS)
            else:
                q, k, v = (seen[layer, n][1].reshape(*ids.shape, -1, w.d_head) for n in modules)
            for which, ref in zip("QKV", (q, k, v), strict=True):
                torch.testing.assert_close(per_head(w, x, which), ref, **TOL)


def test_llama_grouped_query_heads():
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


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_hf_attention_layer_out_of_range(arch):
    adapter = make_hf(arch)
    with pytest.raises(AdapterError, match="out of range"):
        adapter.attention_weights(LAYERS)
    with pytest.raises(AdapterError, match="out of range"):
        adapter.attention_weights(-LAYERS - 1)
    torch.testing.assert_close(adapter.attention_weights(-1).W_Q, adapter.attention_weights(LAYERS - 1).W_Q)


# ----- HF: output embeddings -----------------------------------------------------------------------------------


def logits_and_output_of(model: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor):
    """The model's logits and what ``module`` output during that forward (a plain torch hook)."""
    seen = {}
    handle = module.register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    return logits, seen["out"]


@pytest.mark.parametrize("arch", [a for a in HF_ARCHS if a != "bert"])
def test_hf_causal_logits_from_output_embeddings(arch):
    adapter = make_hf(arch)
    model = adapter.model
    ids = token_batch(B=2, T=6, seed=5)
    logits, normed = logits_and_output_of(model, model.get_submodule(FINAL_NORM[arch]), ids)
    E = adapter.output_embeddings()
    assert E.shape == (VOCAB, adapter.d_model)
    bias = model.lm_head.bias
    expected = normed @ E.T + (0 if bias is None else bias)
    torch.testing.assert_close(expected, logits, **TOL)
    if arch == "gptj":
        assert bias is not None  # the head-bias case is exercised
    tied = {"gpt2": True, "gpt_neo": True, "gptj": False, "gpt_neox": False, "llama": False}[arch]
    assert adapter.output_embeddings_kind == ("tied input/output embedding" if tied else "output embedding (untied)")


def test_bert_mlm_decoder_from_output_embeddings():
    adapter = make_hf("bert")
    model = adapter.model
    preds = model.cls.predictions
    ids = token_batch(B=2, T=6, seed=6)
    logits, transformed = logits_and_output_of(model, preds.transform, ids)
    E = adapter.output_embeddings()
    assert E.shape == (VOCAB, adapter.d_model)
    torch.testing.assert_close(transformed @ E.T + preds.bias, logits, **TOL)
    with torch.no_grad():  # also on a random hidden state, through the head's own modules
        h = torch.randn(5, adapter.d_model, generator=torch.Generator().manual_seed(0))
        t = preds.transform(h)
        torch.testing.assert_close(preds.decoder(t), t @ E.T + preds.bias, **TOL)
    assert adapter.output_embeddings_kind == "MLM decoder"


def test_bert_encoder_has_no_output_embeddings():
    adapter = make_hf("bert_encoder")
    with pytest.raises(AdapterError, match="no output head"):
        adapter.output_embeddings()
    assert adapter.output_embeddings_kind.startswith("none")
    assert adapter.attention_weights(0).n_heads == HEADS  # its attention is still readable


# ----- fairseq -------------------------------------------------------------------------------------------------


def word_ids(adapter: FairseqLMAdapter, B: int, T: int, seed: int) -> torch.Tensor:
    """Random ids of real words (dictionary symbols after the 4 specials), starting with </s>."""
    ids = token_batch(B, T, seed, high=adapter.vocab_size - 4) + 4
    ids[:, 0] = adapter.bos_id
    return ids


@pytest.mark.parametrize("name", FAIRSEQ_MODELS)
def test_fairseq_single_token_attn_out_from_weights(name, fairseq_adapters):
    adapter = fairseq_adapters(name)
    ids = token_batch(B=4, T=1, seed=7, high=adapter.vocab_size - 4) + 4
    ids[0, 0] = adapter.bos_id
    with capture(adapter, ["resid_pre", "attn_out"]) as c, torch.no_grad():
        adapter.run(ids)
    with torch.no_grad():
        for layer in range(adapter.n_layers):
            w = adapter.attention_weights(layer)
            assert w.n_heads == w.n_kv_heads == adapter.layers[layer].self_attn.num_heads
            x = fairseq_attn_input(adapter, layer, c["resid_pre", layer])
            torch.testing.assert_close(single_token_attn_out(w, x), c["attn_out", layer], **TOL)


@pytest.mark.parametrize("name", FAIRSEQ_MODELS)
def test_fairseq_qkv_and_full_attention_from_weights(name, fairseq_adapters):
    """q/k/v: the model's own projection modules applied to the attention's input (fairseq's fast path calls
    torch's attention with the raw weights, so module hooks would not fire); full causal attention at T>1
    recomputed from the weights, with fairseq's d_head**-0.5 scaling applied here, equals attn_out."""
    adapter = fairseq_adapters(name)
    ids = word_ids(adapter, B=1, T=8, seed=8)
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(adapter.layers):
        def keep(_m, args, kwargs, layer=layer):
            inputs[layer] = (args[0] if args else kwargs["query"]).transpose(0, 1)  # batch-first

        handles.append(block.self_attn.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with capture(adapter, ["resid_pre", "attn_out"]) as c, torch.no_grad():
            adapter.run(ids)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for layer, block in enumerate(adapter.layers):
            attn = block.self_attn
            w = adapter.attention_weights(layer)
            x = inputs[layer]
            torch.testing.assert_close(x, fairseq_attn_input(adapter, layer, c["resid_pre", layer]), **TOL)
            H, dh = attn.num_heads, attn.head_dim
            q, k, v = (proj(x).reshape(*x.shape[:-1], H, dh) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            for which, ref in zip("QKV", (q, k, v), strict=True):
                torch.testing.assert_close(per_head(w, x, which), ref, **TOL)
            T = x.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            out = 0
            for h in range(w.n_heads):
                qh, kh, vh = (per_head(w, x, which)[..., h, :] for which in "QKV")
                scores = (qh * dh**-0.5) @ kh.transpose(-1, -2)
                probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
                out = out + (probs @ vh) @ w.W_O[h]
            torch.testing.assert_close(out + w.b_O, c["attn_out", layer], **TOL)


def test_fairseq_attention_layer_out_of_range(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_plain_lm")
    with pytest.raises(AdapterError, match="out of range"):
        adapter.attention_weights(adapter.n_layers)


def test_fairseq_plain_logits_from_output_embeddings(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_plain_lm")
    dec = adapter.decoder
    ids = word_ids(adapter, B=2, T=6, seed=9)
    with torch.no_grad():
        logits, _ = dec(ids)  # the model's own forward: features -> output_projection
        stream = adapter.run(ids)
        h = stream if dec.layer_norm is None else dec.layer_norm(stream)
        E = adapter.output_embeddings()
        assert E.shape == (adapter.vocab_size, adapter.d_model)
        torch.testing.assert_close(h @ E.T, logits, **TOL)
        torch.testing.assert_close(torch.log_softmax(h @ E.T, -1), adapter.project(stream), **TOL)
    tied = dec.output_projection.weight is dec.embed_tokens.weight
    assert adapter.output_embeddings_kind == ("tied input/output embedding" if tied else "output embedding (untied)")


def test_fairseq_adaptive_output_embeddings_per_band(fairseq_adapters):
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
