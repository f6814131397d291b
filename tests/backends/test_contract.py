"""The LMAdapter contract, for every backend (tests/backends/conftest.py: ``adapter``, ``text_adapter``).

Each member is checked against an independent reference: HF ``output_hidden_states`` and logits, fairseq's
own decoder output (inner states, ``get_normalized_probs``), plain torch hooks registered here on the models'
own modules, and recomputation from weights with module paths, head layouts, rotary embeddings and attention
masks written out here from the modelling code (never read from the adapters' tables), or planted answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from fflayers.core import HOOK_POINTS, ModelError
from fflayers.hooks import block_attention, capture, intervene, replace

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # fairseq's own

TOL = {"rtol": 1e-5, "atol": 1e-5}
ATTN_TOL = {"rtol": 1e-4, "atol": 1e-5}  # softmax and rotary recomputed in another order
T_LEN, N_PAD = 12, 3  # longer than the 8-token local / sliding windows of the tiny GPT-Neo and Mistral


# ----- where each family keeps its parts (written from the transformers modelling code) -------------------


@dataclass(frozen=True)
class Family:
    """Module paths (block-relative unless noted) and wiring of one HF family."""

    blocks: str  # model-relative ModuleList of blocks
    layout: str
    ln1: str | None  # norm the attention reads (None: it reads resid_pre)
    ln2: str | None  # norm whose output the MLP reads (post-LN: the attention sublayer's LayerNorm)
    attn: str  # output element 0 is the attention sublayer output
    qkv: tuple[str, ...]  # q, k, v projections, or one fused projection
    fc_in: str
    fc_out: str
    mlp: str  # output is the MLP output
    act: str  # config attribute naming the activation
    ln_out: str | None = None  # post-LN: the block's output LayerNorm
    fused: str | None = None  # fused q/k/v: "q|k|v" (three d-wide blocks), "per-head" ([H, 3, d_head]) or
    #                           "q|kv" (blocks: every q head, then the k heads, then the v heads)
    up: str | None = None  # gated MLP: up projection
    conv1d: bool = False  # GPT-2 Conv1D: weight [in, out]
    final_norm: str | None = None  # model-relative norm before the head
    pos_embed: str | None = None  # model-relative learned absolute position embedding added to the tokens
    rotary: str | None = None  # "interleaved" (GPT-J rotate_every_two), "half" (NeoX / Llama rotate_half)
    scaled: bool = True  # scores times d_head ** -0.5 (GPT-Neo: unscaled)
    causal: bool = True
    tied: bool = False  # head weight is the token embedding
    qk_norm: tuple[str, str] | None = None  # per-head norms of q and k before the rotary embedding
    qk_norm_joint: bool = False  # the q / k norms read all heads at once (OLMo 2), not each head alone
    gate_up: bool = False  # fc_in is a fused gate | up projection (Phi-3): gate = first half of its output
    post_attn: str | None = None  # sandwich blocks: the norm after the attention (``attn`` is then this norm)
    post_mlp: str | None = None  # sandwich blocks: the norm after the MLP (``mlp`` is then this norm)
    scale_attr: str | None = None  # config attribute s: scores times s ** -0.5 (Gemma 2)
    softcap_attr: str | None = None  # config attribute c: scores c * tanh(scores / c) (Gemma 2)
    logit_softcap_attr: str | None = None  # config attribute c: logits c * tanh(head(h) / c) (Gemma 2)
    logit_scale_attr: str | None = None  # config attribute s: logits s * head(h) (Cohere)
    mlm: MLMHead | None = None  # masked LMs: the MLM head's parts


@dataclasses.dataclass(frozen=True)
class MLMHead:
    """An MLM head: dense -> activation -> LayerNorm (the transform), then decoder + bias."""

    head: str | None  # model-relative head module (its forward gives the logits); None: computed inline
    dense: str
    norm: str
    decoder: str
    bias: str  # model-relative parameter added to the decoder's output


_BERT_MLM = MLMHead("cls", "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                    "cls.predictions.decoder", "cls.predictions.bias")
_ROBERTA_MLM = MLMHead("lm_head", "lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias")
_DISTILBERT_MLM = MLMHead(None, "vocab_transform", "vocab_layer_norm", "vocab_projector",
                          "vocab_projector.bias")

_LLAMA = Family("model.layers", "pre_norm", "input_layernorm", "post_attention_layernorm", "self_attn",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "mlp.gate_proj",
                "mlp.down_proj", "mlp", "hidden_act", up="mlp.up_proj", final_norm="model.norm",
                rotary="half")
_ROBERTA = Family("roberta.encoder.layer", "post_norm", None, "attention.output.LayerNorm",
                  "attention.output.dense",
                  ("attention.self.query", "attention.self.key", "attention.self.value"),
                  "intermediate.dense", "output.dense", "output.dense", "hidden_act",
                  ln_out="output.LayerNorm", causal=False, mlm=_ROBERTA_MLM)
HF = {
    "gpt2": Family("transformer.h", "pre_norm", "ln_1", "ln_2", "attn", ("attn.c_attn",), "mlp.c_fc",
                   "mlp.c_proj", "mlp", "activation_function", fused="q|k|v", conv1d=True,
                   final_norm="transformer.ln_f", pos_embed="transformer.wpe", tied=True),
    "gpt_bigcode": Family("transformer.h", "pre_norm", "ln_1", "ln_2", "attn", ("attn.c_attn",), "mlp.c_fc",
                          "mlp.c_proj", "mlp", "activation_function", fused="q|kv",
                          final_norm="transformer.ln_f", pos_embed="transformer.wpe", tied=True),
    "gpt_neo": Family("transformer.h", "pre_norm", "ln_1", "ln_2", "attn",
                      ("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"), "mlp.c_fc",
                      "mlp.c_proj", "mlp", "activation_function", final_norm="transformer.ln_f",
                      pos_embed="transformer.wpe", scaled=False, tied=True),
    "gptj": Family("transformer.h", "parallel", "ln_1", "ln_1", "attn",
                   ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "mlp.fc_in", "mlp.fc_out", "mlp",
                   "activation_function", final_norm="transformer.ln_f", rotary="interleaved"),
    "gpt_neox": Family("gpt_neox.layers", "parallel", "input_layernorm", "post_attention_layernorm",
                       "attention", ("attention.query_key_value",), "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
                       "mlp", "hidden_act", fused="per-head", final_norm="gpt_neox.final_layer_norm",
                       rotary="half"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": dataclasses.replace(_LLAMA, qk_norm=("self_attn.q_norm", "self_attn.k_norm")),
    "olmo": _LLAMA,
    "olmo2": dataclasses.replace(_LLAMA, layout="sandwich", ln1=None, ln2=None,
                                 attn="post_attention_layernorm", mlp="post_feedforward_layernorm",
                                 post_attn="post_attention_layernorm", post_mlp="post_feedforward_layernorm",
                                 qk_norm_joint=True,
                                 qk_norm=("self_attn.q_norm", "self_attn.k_norm")),
    "smollm3": dataclasses.replace(_LLAMA, tied=True),
    "stablelm": dataclasses.replace(_LLAMA, layout="parallel", ln2="input_layernorm",
                        qk_norm=("self_attn.q_layernorm", "self_attn.k_layernorm")),
    "starcoder2": dataclasses.replace(_LLAMA, fc_in="mlp.c_fc", fc_out="mlp.c_proj", up=None, tied=True),
    "gemma": dataclasses.replace(_LLAMA, tied=True),
    "cohere": dataclasses.replace(_LLAMA, layout="parallel", ln2="input_layernorm", rotary="interleaved",
                                  logit_scale_attr="logit_scale", tied=True),
    "gemma2": dataclasses.replace(_LLAMA, layout="sandwich", ln2="pre_feedforward_layernorm",
                                  act="hidden_activation",
                                  attn="post_attention_layernorm", mlp="post_feedforward_layernorm",
                                  post_attn="post_attention_layernorm", post_mlp="post_feedforward_layernorm",
                                  scale_attr="query_pre_attn_scalar", softcap_attr="attn_logit_softcapping",
                                  logit_softcap_attr="final_logit_softcapping", tied=True),
    "phi3": dataclasses.replace(_LLAMA, qkv=("self_attn.qkv_proj",), fused="q|kv", fc_in="mlp.gate_up_proj",
                                up=None, gate_up=True),
    "phi": dataclasses.replace(_LLAMA, layout="parallel", ln2="input_layernorm", fc_in="mlp.fc1",
                               fc_out="mlp.fc2", up=None, final_norm="model.final_layernorm"),
    "bert": Family("bert.encoder.layer", "post_norm", None, "attention.output.LayerNorm",
                   "attention.output.dense",
                   ("attention.self.query", "attention.self.key", "attention.self.value"),
                   "intermediate.dense", "output.dense", "output.dense", "hidden_act",
                   ln_out="output.LayerNorm", causal=False, mlm=_BERT_MLM),
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "distilbert": Family("distilbert.transformer.layer", "post_norm", None, "sa_layer_norm", "attention",
                         ("attention.q_lin", "attention.k_lin", "attention.v_lin"), "ffn.lin1", "ffn.lin2",
                         "ffn", "activation", ln_out="output_layer_norm", causal=False, mlm=_DISTILBERT_MLM),
}
HF["gemma3_text"] = dataclasses.replace(HF["gemma2"], qk_norm=("self_attn.q_norm", "self_attn.k_norm"))


def is_fairseq(adapter) -> bool:
    return adapter.family == "fairseq"


def family(adapter) -> Family:
    if adapter.family not in HF:
        pytest.fail(f"no reference written for HF family {adapter.family!r}: add it to HF in this file")
    return HF[adapter.family]


def blocks_of(adapter) -> list[torch.nn.Module]:
    if is_fairseq(adapter):
        return list(adapter.model.decoder.layers)
    return list(adapter.model.get_submodule(family(adapter).blocks))


@dataclass
class BlockParts:
    """One block's modules, as the model's own code wires them."""

    layout: str
    ln1: Callable | None
    ln2: Callable
    ln_out: Callable | None
    attn: torch.nn.Module
    attn_in: torch.nn.Module  # its input is what the attention reads
    fc_in: Any  # a torch.nn.Module, or a HalfOf one
    fc_out: torch.nn.Module
    mlp_out: torch.nn.Module
    act: Callable
    up: Any  # a torch.nn.Module, a HalfOf one, or None
    conv1d: bool  # GPT-2 Conv1D: weights stored [in, out] (fc_in [d, d_ff], fc_out [d_ff, d])
    post_attn: Callable = lambda x: x  # the norm after the attention (sandwich blocks), else the identity
    post_mlp: Callable = lambda x: x  # the norm after the MLP (sandwich blocks), else the identity


def parts(adapter, layer: int) -> BlockParts:
    block = blocks_of(adapter)[layer]
    if is_fairseq(adapter):
        pre = bool(adapter.model.decoder.cfg.decoder.normalize_before)
        return BlockParts("pre_norm" if pre else "post_norm", block.self_attn_layer_norm if pre else None,
                          block.final_layer_norm if pre else block.self_attn_layer_norm,
                          None if pre else block.final_layer_norm, block.self_attn, block.self_attn,
                          block.fc1, block.fc2, block.fc2, block.activation_fn, None, False)
    from transformers.activations import ACT2FN

    fam = family(adapter)
    get = block.get_submodule
    act = ACT2FN[getattr(adapter.model.config, fam.act)]
    fc_in, up = get(fam.fc_in), None if fam.up is None else get(fam.up)
    if fam.gate_up:
        half = fc_in.out_features // 2
        fc_in, up = HalfOf(fc_in, 0, half), HalfOf(fc_in, half, 2 * half)
    post = {name: get(path) for name, path in (("post_attn", fam.post_attn), ("post_mlp", fam.post_mlp))
            if path}
    return BlockParts(fam.layout, None if fam.ln1 is None else get(fam.ln1),
                      (lambda x: x) if fam.ln2 is None else get(fam.ln2),
                      None if fam.ln_out is None else get(fam.ln_out), get(fam.attn), get(fam.qkv[0]),
                      fc_in, get(fam.fc_out), get(fam.mlp), act, up, fam.conv1d, **post)


class HalfOf:
    """Output features ``start:stop`` of a fused ``nn.Linear`` (Phi-3's gate | up), as a projection of its
    own: called, its weight and bias, and forward hooks that see that slice."""

    def __init__(self, linear: torch.nn.Linear, start: int, stop: int) -> None:
        self.linear, self.start, self.stop = linear, start, stop
        self.weight = linear.weight[start:stop]
        self.bias = None if linear.bias is None else linear.bias[start:stop]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)[..., self.start : self.stop]

    def register_forward_pre_hook(self, hook, **kwargs):
        return self.linear.register_forward_pre_hook(hook, **kwargs)

    def register_forward_hook(self, hook):
        return self.linear.register_forward_hook(
            lambda module, args, output: hook(module, args, output[..., self.start : self.stop]))


def final_norm(adapter) -> torch.nn.Module | None:
    if is_fairseq(adapter):
        return adapter.model.decoder.layer_norm
    path = family(adapter).final_norm
    return None if path is None else adapter.model.get_submodule(path)


def bias(module: torch.nn.Module):
    return 0.0 if getattr(module, "bias", None) is None else module.bias


def batch(adapter, B: int = 2, T: int = T_LEN, pad: int = N_PAD, seed: int = 0):
    """Random word ids (fairseq: ``</s>`` first), row 1 right-padded by ``pad``: the padded slots hold real
    word ids, so only the mask marks them."""
    g = torch.Generator().manual_seed(seed)
    low = 4 if is_fairseq(adapter) else 1  # past fairseq's <s> <pad> </s> <unk> / the tiny models' pad 0
    ids = torch.randint(low, adapter.vocab_size, (B, T), generator=g)
    if is_fairseq(adapter):
        ids[:, 0] = adapter.model.decoder.dictionary.eos()
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1 and pad:
        mask[1, T - pad :] = False
    return ids, mask


# ----- the reference forward pass: the model's own outputs and plain torch hooks --------------------------


@contextmanager
def module_hooks(adapter, layers=None):
    """Record, with plain torch hooks on the model's own modules, each block's attention input and output,
    FFN input / pre-activation / coefficients / output, batch-first (fairseq modules are time-first)."""
    seen: dict = {}
    tf = is_fairseq(adapter)
    bf = (lambda x: x.transpose(0, 1)) if tf else (lambda x: x)

    def out_hook(key):
        def hook(_module, _args, output):
            seen[key] = bf((output[0] if isinstance(output, tuple) else output).detach())

        return hook

    def in_hook(key):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["query" if tf else "hidden_states"]
            seen[key] = bf(x.detach())

        return hook

    handles = []
    for layer in range(adapter.n_layers) if layers is None else layers:
        p = parts(adapter, layer)
        handles += [
            p.attn_in.register_forward_pre_hook(in_hook(("attn_in", layer)), with_kwargs=True),
            p.attn.register_forward_hook(out_hook(("attn_out", layer))),
            p.fc_in.register_forward_pre_hook(in_hook(("mlp_in", layer)), with_kwargs=True),
            p.fc_in.register_forward_hook(out_hook(("mlp_key", layer))),
            p.fc_out.register_forward_pre_hook(in_hook(("mlp_coef", layer)), with_kwargs=True),
            p.mlp_out.register_forward_hook(out_hook(("mlp_out", layer))),
        ]
        if not tf:  # fairseq's fast path calls torch's attention with the raw weights: no projection hooks
            for i, path in enumerate(family(adapter).qkv):
                handles.append(blocks_of(adapter)[layer].get_submodule(path).register_forward_hook(
                    out_hook(("proj", layer, i))))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def model_forward(adapter, ids, mask) -> dict:
    """The model's own forward pass: hidden states per block, final features, log-probs, hooked modules."""
    with module_hooks(adapter) as ref, torch.no_grad():
        if is_fairseq(adapter):
            dec = adapter.model.decoder
            tokens = ids.masked_fill(~mask, dec.padding_idx)
            features, extra = dec(tokens, features_only=True)
            states = [s.transpose(0, 1) for s in extra["inner_states"]]
            ref["final"] = features
            net = adapter.model(tokens)
            ref["log_probs"] = adapter.model.get_normalized_probs(net, log_probs=True).float()
        else:
            out = adapter.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
            states = list(out.hidden_states)
            ref["final"] = states[-1]  # after the final norm where the model has one
            ref["log_probs"] = torch.log_softmax(out.logits.float(), dim=-1)
    L = adapter.n_layers
    for layer in range(L):
        ref["resid_pre", layer] = states[layer]
        if layer + 1 < L or is_fairseq(adapter):  # fairseq's last inner state is before the final norm
            ref["resid_post", layer] = states[layer + 1]
    if is_fairseq(adapter):
        for layer in range(L):
            attn = blocks_of(adapter)[layer].self_attn
            for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
                with torch.no_grad():
                    ref["proj", layer, i] = proj(ref["attn_in", layer])
    return ref


# ----- hook points ----------------------------------------------------------------------------------------


def test_hook_points_equal_the_models_own_states_and_modules(adapter):
    """Every hook point (and ``run``) vs HF ``output_hidden_states`` / fairseq inner states and plain torch
    hooks on the block's own modules, at the real positions of a right-padded batch."""
    ids, mask = batch(adapter)
    ref = model_forward(adapter, ids, mask)
    with torch.no_grad(), capture(adapter, HOOK_POINTS) as c:
        final = adapter.run(ids, mask)
    B, T = ids.shape
    L = adapter.n_layers
    for layer in range(L):
        for point in HOOK_POINTS:
            width = adapter.d_ff if point in ("mlp_key", "mlp_coef") else adapter.d_model
            assert c[point, layer].shape == (B, T, width), (point, layer)
            if (point, layer) in ref:
                torch.testing.assert_close(c[point, layer][mask], ref[point, layer][mask], **TOL)
        assert all((point, layer) in ref for point in HOOK_POINTS if point != "resid_post")
    torch.testing.assert_close(final, c["resid_post", L - 1])
    norm = final_norm(adapter)
    with torch.no_grad():
        normed = final if norm is None else norm(final)
    torch.testing.assert_close(normed[mask], ref["final"][mask], **TOL)


def test_hook_points_follow_the_block_wiring(adapter):
    """Hook points vs recomputation from the block's own norms and from ``ffn_keys`` / ``ffn_values``:
    attn_in = ln1(resid_pre), mlp_in per layout, mlp_key = mlp_in K^T + b, mlp_coef = act(key) [* up],
    mlp_out = sum_i m_i V_i + b, resid_post per ``block_layout``, resid_pre of l+1 = resid_post of l."""
    ids, mask = batch(adapter)
    with torch.no_grad(), capture(adapter, HOOK_POINTS) as c:
        adapter.run(ids, mask)
    m = mask
    for layer in range(adapter.n_layers):
        p = parts(adapter, layer)
        assert adapter.block_layout == p.layout
        x, a_in, a_out, m_in, key, coef, out, post = (c[q, layer] for q in HOOK_POINTS)
        with torch.no_grad():
            torch.testing.assert_close(a_in[m], (x if p.ln1 is None else p.ln1(x))[m], **TOL)
            if p.layout == "parallel":
                want_in, want_post = p.ln2(x), x + a_out + out
            elif p.layout in ("pre_norm", "sandwich"):
                want_in, want_post = p.ln2(x + a_out), x + a_out + out
            else:
                want_in = p.ln2(x + a_out)
                want_post = p.ln_out(want_in + out)
            torch.testing.assert_close(m_in[m], want_in[m], **TOL)
            torch.testing.assert_close(post[m], want_post[m], **TOL)
            want_key = m_in @ adapter.ffn_keys(layer).T + bias(p.fc_in)
            torch.testing.assert_close(key[m], want_key[m], **TOL)
            want_coef = p.act(want_key) * (1.0 if p.up is None else p.up(m_in))
            torch.testing.assert_close(coef[m], want_coef[m], **TOL)
            want_out = p.post_mlp(coef @ adapter.ffn_values(layer) + bias(p.fc_out))
            torch.testing.assert_close(out[m], want_out[m], **TOL)
        if layer + 1 < adapter.n_layers:
            torch.testing.assert_close(c["resid_pre", layer + 1][m], post[m])


def test_edits_of_attn_in_and_mlp_in_reach_their_sublayer(adapter):
    """attn_in := 0 makes every value b_V, so whatever the scores attn_out = sum_h b_V W_O[h] + b_O at every
    position (q, k and v all read the edited input); mlp_in := v gives mlp_out = the block's own MLP modules
    applied to v (gate and up both)."""
    ids, mask = batch(adapter, B=1, pad=0)
    v = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), intervene(adapter, [replace("attn_in", 1, 0.0), replace("mlp_in", 0, v)]), \
            capture(adapter, ["attn_out", "mlp_out"], [0, 1]) as c:
        adapter.run(ids, mask)
    w = adapter.attention_weights(1)
    p = parts(adapter, 0)
    with torch.no_grad():
        b_v = torch.zeros(w.n_kv_heads, w.d_head) if w.b_V is None else w.b_V
        want = sum(b_v[w.kv_head(h)] @ w.W_O[h] for h in range(w.n_heads)) + (0 if w.b_O is None else w.b_O)
        want = parts(adapter, 1).post_attn(want)
        mlp = p.post_mlp(p.fc_out(p.act(p.fc_in(v)) * (1.0 if p.up is None else p.up(v))))
    torch.testing.assert_close(c["attn_out", 1], want.expand_as(c["attn_out", 1]), **TOL)
    torch.testing.assert_close(c["mlp_out", 0], mlp.expand_as(c["mlp_out", 0]), **TOL)


def test_right_padding_does_not_change_real_positions(adapter):
    """The padded row of a batch (real word ids in its padded slots) vs the same row run alone, unpadded."""
    ids, mask = batch(adapter)
    n = int(mask[1].sum())
    with torch.no_grad():
        together = adapter.log_probs(ids, mask)[1, :n]
        alone = adapter.log_probs(ids[1:, :n])[0]
    torch.testing.assert_close(together, alone, **TOL)


# ----- embeddings and the output head ----------------------------------------------------------------------


def test_input_embeddings_feed_the_first_block(adapter):
    """``input_embeddings`` vs the embedding module's own lookup (fairseq: times ``embed_scale``, adaptive
    input included); resid_pre of block 0 = E[ids] + the learned position embedding (not BERT: it norms)."""
    E = adapter.input_embeddings()
    assert E.shape == (adapter.vocab_size, adapter.d_model)
    ids, mask = batch(adapter)
    with torch.no_grad(), capture(adapter, "resid_pre", [0]) as c:
        adapter.run(ids, mask)
    every = torch.arange(adapter.vocab_size)
    with torch.no_grad():
        if is_fairseq(adapter):
            dec = adapter.model.decoder
            torch.testing.assert_close(E, dec.embed_scale * dec.embed_tokens(every[None])[0])
            tokens = ids.masked_fill(~mask, dec.padding_idx)
            positions = 0 if dec.embed_positions is None else dec.embed_positions(tokens)
        else:
            torch.testing.assert_close(E, adapter.model.get_input_embeddings()(every))
            if adapter.is_masked_lm:  # token + position + type embeddings, then a LayerNorm
                return
            path = family(adapter).pos_embed
            positions = 0 if path is None else adapter.model.get_submodule(path)(torch.arange(ids.shape[1]))
    torch.testing.assert_close(c["resid_pre", 0][mask], (E[ids] + positions)[mask], **TOL)


def test_project_of_the_last_stream_is_the_models_own_log_probs(adapter):
    """``project(run(ids))`` (chunked) and ``log_probs`` vs log_softmax of HF ``logits`` / fairseq
    ``get_normalized_probs``; each row sums to probability 1."""
    ids, mask = batch(adapter)
    ref = model_forward(adapter, ids, mask)
    with torch.no_grad():
        got = adapter.project(adapter.run(ids, mask), chunk_size=5)
        lp = adapter.log_probs(ids, mask)
    assert got.shape == (*ids.shape, adapter.vocab_size)
    torch.testing.assert_close(got[mask], ref["log_probs"][mask], **TOL)
    torch.testing.assert_close(lp[mask], ref["log_probs"][mask], **TOL)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(ids.shape), rtol=0, atol=1e-4)


def head_log_probs(adapter, h: torch.Tensor) -> torch.Tensor:
    """The model's own head on ``h`` (no final norm): HF output embeddings module (BERT: the MLM head with its
    transform), fairseq ``output_layer`` + ``get_normalized_probs`` (adaptive softmax reads features)."""
    if is_fairseq(adapter):
        net = (adapter.model.decoder.output_layer(h), None)
        return adapter.model.get_normalized_probs(net, log_probs=True).float()
    mlm = None if is_fairseq(adapter) else family(adapter).mlm
    if mlm is not None and mlm.head is None:  # the MLM head computed inline by the model class (DistilBERT)
        return torch.log_softmax(mlm_by_hand(adapter, mlm, h).float(), dim=-1)
    head = adapter.model.get_submodule(mlm.head) if mlm else adapter.model.get_output_embeddings()
    return torch.log_softmax(softcapped(adapter, head(h).float()), dim=-1)


def mlm_by_hand(adapter, mlm: MLMHead, h: torch.Tensor) -> torch.Tensor:
    """decoder(norm(act(dense(h)))), the activation named by the family's config attribute."""
    from transformers.activations import ACT2FN

    part = adapter.model.get_submodule
    act = ACT2FN[getattr(adapter.model.config, family(adapter).act)]
    return part(mlm.decoder)(part(mlm.norm)(act(part(mlm.dense)(h))))


def softcapped(adapter, logits: torch.Tensor) -> torch.Tensor:
    """The head's logits as the family's causal-LM class returns them: times ``logit_scale`` (Cohere), then
    ``c * tanh(logits / c)`` (Gemma 2)."""
    fam = None if is_fairseq(adapter) else family(adapter)
    if fam is not None and fam.logit_scale_attr:
        logits = logits * getattr(adapter.model.config, fam.logit_scale_attr)
    attr = None if fam is None else fam.logit_softcap_attr
    cap = getattr(adapter.model.config, attr) if attr else None
    return logits if not cap else cap * torch.tanh(logits / cap)


def test_project_with_and_without_the_final_norm(adapter):
    """``project(h, final_norm=False)`` = the bare head on h; ``project(h)`` = the head on final_norm(h) (the
    model's own ln_f / norm / decoder layer_norm); the same without a final norm, else different."""
    h = torch.randn(2, 5, adapter.d_model, generator=torch.Generator().manual_seed(1))
    norm = final_norm(adapter)
    with torch.no_grad():
        bare = adapter.project(h, final_norm=False)
        normed = adapter.project(h)
        torch.testing.assert_close(bare, head_log_probs(adapter, h), **TOL)
        torch.testing.assert_close(normed, head_log_probs(adapter, h if norm is None else norm(h)), **TOL)
    if norm is None:
        torch.testing.assert_close(normed, bare)
    else:  # the fixtures' norms are not the identity
        assert not torch.allclose(normed, bare, atol=1e-3)


def test_output_embeddings_give_the_models_logits(adapter):
    """``output_embeddings`` E: h_final @ E.T (+ head bias) vs the model's own logits (HF: h_final hooked on
    the final norm / BERT's MLM transform; fairseq full softmax: decoder logits); adaptive softmax: within
    each band, log_softmax(h @ E[band].T) = the band's renormalised ``project`` log-probs; the kind string."""
    E = adapter.output_embeddings()
    assert E.shape == (adapter.vocab_size, adapter.d_model)
    ids, mask = batch(adapter, B=1, pad=0)
    model = adapter.model
    with torch.no_grad():
        if is_fairseq(adapter):
            dec = model.decoder
            asm = dec.adaptive_softmax
            if asm is not None:
                assert adapter.output_embeddings_kind == "adaptive softmax: head rows + tail projections"
                h = torch.randn(6, adapter.d_model, generator=torch.Generator().manual_seed(10))
                lp = adapter.project(h, final_norm=False)
                cuts = [0, *(int(c) for c in asm.cutoff)]
                assert cuts[-1] == adapter.vocab_size and len(cuts) >= 4  # head band and >= 2 tail bands
                for a, b in zip(cuts, cuts[1:], strict=False):
                    torch.testing.assert_close(torch.log_softmax(h @ E[a:b].T, -1),
                                               torch.log_softmax(lp[:, a:b], -1), **TOL)
                return
            logits, _ = dec(ids)
            stream = adapter.run(ids)
            normed = stream if dec.layer_norm is None else dec.layer_norm(stream)
            torch.testing.assert_close(normed @ E.T, logits, **TOL)
            torch.testing.assert_close(torch.log_softmax(normed @ E.T, -1), adapter.project(stream), **TOL)
            tied = dec.output_projection.weight is dec.embed_tokens.weight
        elif family(adapter).mlm is not None:
            mlm = family(adapter).mlm
            part = model.get_submodule
            head_bias = model.get_parameter(mlm.bias)
            logits, transformed = logits_and_output_of(model, part(mlm.norm), ids)
            torch.testing.assert_close(transformed @ E.T + head_bias, logits, **TOL)
            h = torch.randn(5, adapter.d_model, generator=torch.Generator().manual_seed(0))
            from transformers.activations import ACT2FN

            act = ACT2FN[getattr(model.config, family(adapter).act)]  # the transform by hand, the decoder
            t = part(mlm.norm)(act(part(mlm.dense)(h)))
            torch.testing.assert_close(part(mlm.decoder)(t), t @ E.T + head_bias, **TOL)
            if mlm.head is not None:
                torch.testing.assert_close(part(mlm.head)(h), t @ E.T + head_bias, **TOL)
            assert adapter.output_embeddings_kind == "MLM decoder"
            return
        else:
            logits, normed = logits_and_output_of(model, final_norm(adapter), ids)
            head_bias = getattr(model.get_output_embeddings(), "bias", None)
            if adapter.family == "gptj":
                assert head_bias is not None  # the head-bias case is exercised
            biased = normed @ E.T + (0 if head_bias is None else head_bias)
            torch.testing.assert_close(softcapped(adapter, biased), logits, **TOL)
            tied = family(adapter).tied
    want = "tied input/output embedding" if tied else "output embedding (untied)"
    assert adapter.output_embeddings_kind == want


def logits_and_output_of(model, module, ids):
    """The model's logits and what ``module`` output during that forward (a plain torch hook)."""
    seen = {}

    def keep(_module, _args, output):
        seen["out"] = output

    handle = module.register_forward_hook(keep)
    try:
        logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    return logits, seen["out"]


# ----- FFN weights ------------------------------------------------------------------------------------------


def value_rows(weight: torch.Tensor, conv1d: bool, index) -> torch.Tensor:
    """Rows ``index`` of the value matrix read straight from the output projection's parameter."""
    return weight.detach()[index] if conv1d else weight.detach()[:, index].T


def test_ffn_keys_and_values_are_views_of_the_projection_weights(adapter):
    """``ffn_keys`` / ``ffn_values`` ([d_ff, d]) vs the fc_in / fc_out parameters read through the module
    paths here (GPT-2 Conv1D stored [in, out]); values share the parameter's storage; negative layers count
    back."""
    L = adapter.n_layers
    for layer in range(L):
        shape = (adapter.d_ff, adapter.d_model)
        assert adapter.ffn_keys(layer).shape == adapter.ffn_values(layer).shape == shape
        p = parts(adapter, layer)
        keys = p.fc_in.weight.detach()
        assert torch.equal(adapter.ffn_keys(layer), keys.T if p.conv1d else keys)
        values = adapter.ffn_values(layer)
        assert torch.equal(values, value_rows(p.fc_out.weight, p.conv1d, list(range(adapter.d_ff))))
        assert values.untyped_storage().data_ptr() == p.fc_out.weight.untyped_storage().data_ptr()
    assert torch.equal(adapter.ffn_keys(-1), adapter.ffn_keys(L - 1))


def test_write_ffn_values_plants_rows_and_undo_restores(adapter):
    """Planted value rows land in the model's own fc_out parameter (only there), move mlp_out by exactly
    sum_i m_i (new_i - old_i) with the coefficients m captured before, change the output; writing the saved
    rows back restores every parameter bit for bit and the original log-probs."""
    layer, index = adapter.n_layers - 1, [5, 9]
    ids, mask = batch(adapter)
    p = parts(adapter, layer)
    weight = p.fc_out.weight
    weight_before = weight.detach().clone()
    params = {n: q.detach().clone() for n, q in adapter.model.named_parameters()}
    with torch.no_grad(), capture(adapter, ["mlp_coef", "mlp_out"], [layer]) as before:
        plain = adapter.log_probs(ids, mask)
    saved = adapter.ffn_values(layer)[index].clone()
    rows = torch.arange(len(index) * adapter.d_model, dtype=torch.float32).reshape(len(index), -1) / 7.0
    adapter.write_ffn_values(layer, index, rows)
    try:
        assert torch.equal(value_rows(weight, p.conv1d, index), rows)
        assert torch.equal(adapter.ffn_values(layer)[index], rows)
        keep = [i for i in range(adapter.d_ff) if i not in index]
        assert torch.equal(value_rows(weight, p.conv1d, keep), value_rows(weight_before, p.conv1d, keep))
        assert not weight.requires_grad or weight.grad is None
        with torch.no_grad(), capture(adapter, ["mlp_coef", "mlp_out"], [layer]) as after:
            edited = adapter.log_probs(ids, mask)
        m = before["mlp_coef", layer]
        torch.testing.assert_close(after["mlp_coef", layer], m)
        want = before["mlp_out", layer] + m[..., index] @ (rows - saved)
        if p.layout == "sandwich":  # mlp_out = post_mlp(sum_i m_i v_i + b)
            want = p.post_mlp(m @ adapter.ffn_values(layer) + bias(p.fc_out))
        torch.testing.assert_close(after["mlp_out", layer][mask], want[mask], **TOL)
        assert not torch.allclose(edited, plain, atol=1e-4)
    finally:
        adapter.write_ffn_values(layer, index, saved)
    for name, q in adapter.model.named_parameters():
        assert torch.equal(q.detach(), params[name]), name
    with torch.no_grad():
        assert torch.equal(adapter.log_probs(ids, mask), plain)


def test_write_ffn_values_refuses_bad_index_and_copies(adapter, monkeypatch):
    """An index past d_ff is refused; so is writing through an ``ffn_values`` that returns a copy."""
    row = torch.ones(1, adapter.d_model)
    with pytest.raises(ModelError, match="out of range"):
        adapter.write_ffn_values(0, [adapter.d_ff], row)
    original = type(adapter).ffn_values
    monkeypatch.setattr(adapter, "ffn_values", lambda layer: original(adapter, layer).clone())
    with pytest.raises(ModelError, match="copy"):
        adapter.write_ffn_values(0, [1], row)


# ----- attention -------------------------------------------------------------------------------------------


def heads_of(adapter) -> tuple[int, int]:
    """(query heads, key/value heads) from the model config."""
    if is_fairseq(adapter):
        n = int(adapter.model.decoder.cfg.decoder.attention_heads)
        return n, n
    cfg = adapter.model.config
    n = int(cfg.num_attention_heads)
    if getattr(cfg, "multi_query", False):  # GPT-BigCode: one key/value head
        return n, 1
    return n, int(getattr(cfg, "num_key_value_heads", None) or n)


def window(adapter, layer: int) -> int | None:
    """Local attention span: query t reads keys s with t - s < window (GPT-Neo local layers, Mistral)."""
    cfg = getattr(adapter.model, "config", None)
    if adapter.family == "gpt_neo" and cfg.attention_layers[layer] == "local":
        return int(cfg.window_size)
    if adapter.family in ("mistral", "starcoder2"):
        return cfg.sliding_window
    if getattr(cfg, "layer_types", None) and cfg.layer_types[layer] == "sliding_attention":  # Gemma 2
        return cfg.sliding_window
    return None


def allowed_edges(adapter, layer: int, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, S]`` edges the model itself allows: causal (not BERT), local window, no padded key."""
    B, T = mask.shape
    t, s = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = mask[:, None, :].expand(B, T, T).clone()
    if is_fairseq(adapter) or family(adapter).causal:
        allowed &= s <= t
    span = window(adapter, layer)
    if span is not None:
        allowed &= t - s < span
    return allowed


def rotate(adapter, x: torch.Tensor, layer: int) -> torch.Tensor:
    """The model's rotary position embedding on per-head q or k ``[B, T, d_head]`` at positions 0..T-1 (none
    in the layers a SmolLM3 config marks as without rotary positions)."""
    kind = None if is_fairseq(adapter) else family(adapter).rotary
    no_rope = getattr(getattr(adapter.model, "config", None), "no_rope_layers", None)
    if kind is None or (no_rope is not None and not no_rope[layer]):
        return x
    cfg, dh, T = adapter.model.config, x.shape[-1], x.shape[-2]
    if kind == "interleaved":  # GPT-J, Cohere: pairs (0, 1), (2, 3), ... of the first rotary_dim features
        rope = getattr(cfg, "rope_parameters", None) or {}
        rd, theta = int(getattr(cfg, "rotary_dim", None) or dh), float(rope.get("rope_theta", 10000.0))
    else:  # GPT-NeoX / Llama: halves of the first rd features
        rope = cfg.rope_parameters
        if getattr(cfg, "layer_types", None) and cfg.layer_types[layer] in rope:  # Gemma 3: per layer type
            rope = rope[cfg.layer_types[layer]]
        assert rope.get("rope_type", "default") == "default", rope
        rd, theta = int(dh * rope.get("partial_rotary_factor", 1.0)), float(rope["rope_theta"])
    inv = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)
    angle = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]  # [T, rd / 2]
    xr, rest = x[..., :rd], x[..., rd:]
    if kind == "interleaved":
        cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)
        turned = torch.stack((-xr[..., 1::2], xr[..., ::2]), dim=-1).flatten(-2)
    else:
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        turned = torch.cat((-xr[..., rd // 2 :], xr[..., : rd // 2]), dim=-1)
    return torch.cat((xr * cos + turned * sin, rest), dim=-1)


def head_inputs(adapter, layer: int, which: str, head: int, x: torch.Tensor) -> torch.Tensor:
    """Per-head q / k / v ``x`` as the model reads them before the rotary embedding: clipped where the config
    clips (OLMo ``clip_qkv``), and through the family's q / k norm (Qwen3: one norm for every head; StableLM:
    one LayerNorm per head)."""
    cfg = getattr(adapter.model, "config", None)
    clip = getattr(cfg, "clip_qkv", None)
    if clip is not None:
        x = x.clamp(-clip, clip)
    norms = None if is_fairseq(adapter) else family(adapter).qk_norm
    if norms is None or which == "V":
        return x
    norm = blocks_of(adapter)[layer].get_submodule(norms[0 if which == "Q" else 1])
    return (norm.norms[head] if hasattr(norm, "norms") else norm)(x)


def rebuild_attention(adapter, w, x: torch.Tensor, allowed: torch.Tensor, layer: int) -> torch.Tensor:
    """sum_h softmax(rot(q_h) rot(k_g)^T * scale, masked) v_g W_O[h] + b_O from the per-head weights, with
    g = h // (H / G); a row with no allowed key reads nothing (0, then b_O)."""
    H, G = heads_of(adapter)
    scale = 1.0 if not is_fairseq(adapter) and not family(adapter).scaled else w.d_head ** -0.5
    fam = None if is_fairseq(adapter) else family(adapter)
    cfg = getattr(adapter.model, "config", None)
    if fam is not None and fam.scale_attr:
        scale = getattr(cfg, fam.scale_attr) ** -0.5
    cap = getattr(cfg, fam.softcap_attr) if fam is not None and fam.softcap_attr else None

    def proj(which: str, h: int) -> torch.Tensor:
        W, b = getattr(w, f"W_{which}"), getattr(w, f"b_{which}")
        if fam is not None and fam.qk_norm_joint and which != "V":  # one norm over every head's projection
            full = torch.cat([x @ W[g] + (0 if b is None else b[g]) for g in range(W.shape[0])], dim=-1)
            norm = blocks_of(adapter)[layer].get_submodule(fam.qk_norm[0 if which == "Q" else 1])
            return norm(full)[..., h * w.d_head : (h + 1) * w.d_head]
        return head_inputs(adapter, layer, which, h, x @ W[h] + (0 if b is None else b[h]))

    out = torch.zeros(*x.shape[:-1], w.W_O.shape[-1])
    for h in range(H):
        g = h // (H // G)
        q, k, v = rotate(adapter, proj("Q", h), layer), rotate(adapter, proj("K", g), layer), proj("V", g)
        scores = q @ k.transpose(-1, -2) * scale
        scores = scores if cap is None else cap * torch.tanh(scores / cap)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out = out + (probs @ v) @ w.W_O[h]
    return out + (0 if w.b_O is None else w.b_O)


def split_projections(adapter, ref: dict, layer: int, d_head: int):
    """q, k, v ``[B, T, heads, d_head]`` from the projection modules' outputs seen in the reference pass."""
    fused = None if is_fairseq(adapter) else family(adapter).fused
    if fused is None:
        outs = [ref["proj", layer, i] for i in range(3)]
        return tuple(out.reshape(*out.shape[:-1], -1, d_head) for out in outs)
    out = ref["proj", layer, 0]
    B, T, n = out.shape
    if fused == "q|k|v":  # three d-wide blocks, each head-major
        return tuple(part.reshape(B, T, -1, d_head) for part in out.split(n // 3, dim=-1))
    if fused == "q|kv":  # blocks: all query heads, then the key heads, then the value heads
        kv = heads_of(adapter)[1] * d_head
        return tuple(part.reshape(B, T, -1, d_head) for part in out.split((n - 2 * kv, kv, kv), dim=-1))
    return out.reshape(B, T, -1, 3 * d_head).chunk(3, dim=-1)  # per head: q | k | v


def test_attention_weights_rebuild_the_attention_output(adapter):
    """``attention_weights``: head counts vs the config; x @ W + b per head vs the model's own q/k/v
    projection outputs (fused layouts split here); softmax(QK^T * scale + causal/window/padding mask) V W_O +
    b_O, with the model's rotary embedding applied here, vs the attention sublayer output (torch hook)."""
    ids, mask = batch(adapter)
    ref = model_forward(adapter, ids, mask)
    H, G = heads_of(adapter)
    for layer in range(adapter.n_layers):
        w = adapter.attention_weights(layer)
        assert (w.n_heads, w.n_kv_heads) == (H, G)
        assert [w.kv_head(h) for h in range(H)] == [h // (H // G) for h in range(H)]
        assert w.d_model == adapter.d_model and w.d_head * H == adapter.d_model
        x = ref["attn_in", layer]
        with torch.no_grad():
            for which, got in zip("QKV", split_projections(adapter, ref, layer, w.d_head), strict=True):
                W, b = getattr(w, f"W_{which}"), getattr(w, f"b_{which}")
                mine = torch.einsum("btd,hde->bthe", x, W) + (0 if b is None else b)
                torch.testing.assert_close(mine[mask], got[mask], **TOL)
            rebuilt = rebuild_attention(adapter, w, x, allowed_edges(adapter, layer, mask), layer)
            rebuilt = parts(adapter, layer).post_attn(rebuilt)
        torch.testing.assert_close(rebuilt[mask], ref["attn_out", layer][mask], **ATTN_TOL)


def test_layer_indices_are_checked(adapter):
    """Negative layers count from the end; a layer past the model is refused by check_layer, attention_weights
    and capture; an unknown hook point is refused."""
    L = adapter.n_layers
    assert adapter.check_layer(-1) == L - 1
    torch.testing.assert_close(adapter.attention_weights(-1).W_Q, adapter.attention_weights(L - 1).W_Q)
    with pytest.raises(ModelError, match=f"layer {L} is out of range"):
        adapter.check_layer(L)
    for bad in (L, -L - 1):
        with pytest.raises(ModelError, match="out of range"):
            adapter.attention_weights(bad)
    with pytest.raises(ModelError, match=f"layer {L} is out of range"), capture(adapter, "mlp_key", [L]):
        pass
    with pytest.raises(ModelError, match="unknown hook point"), capture(adapter, ["mlp_keys"]):
        pass


# ----- edge blocking ---------------------------------------------------------------------------------------


def test_blocking_no_edge_is_the_plain_model(adapter):
    """An all-False edge mask in every layer gives the unblocked log-probs, and so does the model after the
    context exits."""
    ids, mask = batch(adapter)
    T = ids.shape[1]
    with torch.no_grad():
        plain = adapter.log_probs(ids, mask)
        nothing = torch.zeros(T, T, dtype=torch.bool)
        with block_attention(adapter, dict.fromkeys(range(adapter.n_layers), nothing)):
            none_blocked = adapter.log_probs(ids, mask)
        after = adapter.log_probs(ids, mask)
    torch.testing.assert_close(none_blocked[mask], plain[mask], **TOL)
    torch.testing.assert_close(after[mask], plain[mask], **TOL)


def test_blocked_edges_equal_the_attention_rebuilt_without_them(adapter):
    """Blocked edges vs the attention rebuilt here with those edges removed from the model's own mask;
    a fully blocked row gives a zero attention output (b_O only), a row blocked except itself reads its own
    value (x_t W_V + b_V) W_O + b_O; earlier layers are untouched; hooks installed before blocking see it."""
    ids, mask = batch(adapter)
    T, layer = ids.shape[1], 1
    blocked = torch.zeros(T, T, dtype=torch.bool)
    blocked[T - 1, 1:4] = True  # the last position may not read positions 1..3
    blocked[7, 2] = True
    blocked[5, :] = True  # position 5 reads nothing
    blocked[6, :] = True
    blocked[6, 6] = False  # position 6 reads only itself
    with torch.no_grad(), capture(adapter, ["attn_out", "resid_pre"], [0, layer]) as plain:
        plain_lp = adapter.log_probs(ids, mask)
    with torch.no_grad(), capture(adapter, ["attn_out", "resid_pre"], [0, layer]) as c, \
            module_hooks(adapter, [layer]) as mine, block_attention(adapter, {layer: blocked}):
        got_lp = adapter.log_probs(ids, mask)
    w = adapter.attention_weights(layer)
    x = mine["attn_in", layer]
    with torch.no_grad():
        want = rebuild_attention(adapter, w, x, allowed_edges(adapter, layer, mask) & ~blocked, layer)
        b_o = torch.zeros(adapter.d_model) if w.b_O is None else w.b_O
        H, G = heads_of(adapter)
        own = sum((x[:, 6] @ w.W_V[h // (H // G)] + (0 if w.b_V is None else w.b_V[h // (H // G)])) @ w.W_O[h]
                  for h in range(H)) + b_o
        post = parts(adapter, layer).post_attn  # sandwich blocks: the norm after the attention
        want, b_o, own = post(want), post(b_o), post(own)
    got = c["attn_out", layer]
    torch.testing.assert_close(got[mask], want[mask], **ATTN_TOL)
    torch.testing.assert_close(mine["attn_out", layer][mask], want[mask], **ATTN_TOL)
    torch.testing.assert_close(got[:, 5], b_o.expand(ids.shape[0], -1), **TOL)
    torch.testing.assert_close(got[:, 6], own, **ATTN_TOL)
    torch.testing.assert_close(c["attn_out", 0], plain["attn_out", 0])
    torch.testing.assert_close(c["resid_pre", layer], plain["resid_pre", layer])
    assert not torch.allclose(got_lp, plain_lp, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(adapter.log_probs(ids, mask), plain_lp)


def test_per_example_edge_masks(adapter):
    """A ``[B, T, S]`` mask blocks edges of one example only: example 0 is unchanged, example 1's fully
    blocked row 3 gives b_O, its other rows are unchanged."""
    ids, mask = batch(adapter)
    T = ids.shape[1]
    per_example = torch.zeros(2, T, T, dtype=torch.bool)
    per_example[1, 3, :] = True
    with torch.no_grad(), capture(adapter, ["attn_out"], [0]) as c:
        adapter.run(ids, mask)
        plain = c["attn_out", 0].clone()
        with block_attention(adapter, {0: per_example}):
            adapter.run(ids, mask)
    w = adapter.attention_weights(0)
    b_o = torch.zeros(adapter.d_model) if w.b_O is None else w.b_O
    torch.testing.assert_close(c["attn_out", 0][0], plain[0], **TOL)
    torch.testing.assert_close(c["attn_out", 0][1, 3], b_o, **TOL)
    rows = [t for t in range(T) if t != 3 and bool(mask[1, t])]
    torch.testing.assert_close(c["attn_out", 0][1, rows], plain[1, rows], **TOL)


# ----- prefix cache ----------------------------------------------------------------------------------------


def test_prefix_cache_then_run_cached_equals_the_whole_run(adapter):
    """``run_cached`` after ``prefix_cache`` vs the whole sequence's stream and hook values at the suffix
    positions (hooks see only the suffix); a cached run longer than the model is refused. Masked LMs and
    fairseq have no cache (documented: None; fairseq's run_cached refuses)."""
    ids = batch(adapter, B=1, T=11, pad=0)[0]
    P, B = 6, 3
    if is_fairseq(adapter) or adapter.is_masked_lm:
        assert adapter.prefix_cache(ids[:, :P], B) is None
        if is_fairseq(adapter):
            with pytest.raises(ModelError, match="cannot cache"):
                adapter.run_cached(None, ids[:, P:])
        return
    with torch.no_grad(), capture(adapter, ["mlp_coef", "attn_out"], [1]) as whole:
        full = adapter.run(ids.expand(B, -1))
    cache = adapter.prefix_cache(ids[:, :P], B)
    assert cache is not None
    with torch.no_grad(), capture(adapter, ["mlp_coef", "attn_out"], [1]) as part:
        tail = adapter.run_cached(cache, ids[:, P:].expand(B, -1))
    assert tail.shape == (B, ids.shape[1] - P, adapter.d_model)
    torch.testing.assert_close(tail, full[:, P:], **TOL)
    for point in ("mlp_coef", "attn_out"):
        torch.testing.assert_close(part[point, 1], whole[point, 1][:, P:], **TOL)
    n = adapter.max_positions
    long = torch.randint(1, adapter.vocab_size, (1, n - 2), generator=torch.Generator().manual_seed(3))
    cache = adapter.prefix_cache(long, 1)
    with pytest.raises(ModelError, match="longer than"):
        adapter.run_cached(cache, ids[:, :3])


# ----- sizes and length ------------------------------------------------------------------------------------


def test_sizes_match_the_model_config(adapter):
    """n_layers, d_model, d_ff, vocab_size, max_positions and dtype vs the model's own config (fairseq:
    its TransformerConfig and dictionary); the vocabulary has vocab_size ids."""
    if is_fairseq(adapter):
        dec = adapter.model.decoder
        cfg = dec.cfg
        want = (cfg.decoder.layers, cfg.decoder.embed_dim, cfg.decoder.ffn_embed_dim, len(dec.dictionary),
                cfg.max_target_positions)
    else:
        cfg = adapter.model.config
        d_ff = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
                or cfg.hidden_dim)  # DistilBERT
        positions = cfg.max_position_embeddings
        if family(adapter).mlm is _ROBERTA_MLM:  # RoBERTa's position ids start after the padding id
            positions -= cfg.pad_token_id + 1
        want = (cfg.num_hidden_layers, cfg.hidden_size, d_ff, cfg.vocab_size, positions)
    got = (adapter.n_layers, adapter.d_model, adapter.d_ff, adapter.vocab_size, adapter.max_positions)
    assert got == want
    assert adapter.dtype == torch.float32
    assert len(adapter.vocab) == adapter.vocab.size == adapter.vocab_size


def test_check_length_refuses_a_sequence_longer_than_max_positions(adapter):
    """max_positions tokens run; one more is refused by check_length and run, with a one-line message naming
    the limit (64: the tiny HF configs' positions, the fairseq runs' tokens_per_sample)."""
    n = adapter.max_positions
    assert n == 64
    ids = batch(adapter, B=1, T=n + 1, pad=0)[0]
    adapter.check_length(n)
    with torch.no_grad():
        assert adapter.run(ids[:, :n]).shape == (1, n, adapter.d_model)
    with pytest.raises(ModelError) as err:
        adapter.run(ids)
    msg = str(err.value)
    assert f"longer than the model's {n} positions" in msg and "\n" not in msg
    with pytest.raises(ModelError, match="longer than"):
        adapter.check_length(n + 1)


# ----- the vocabulary --------------------------------------------------------------------------------------

TEXTS = ["The capital of France is", "Tim Cook is the CEO of", "  spaced   words here",
         "Hello, world! 1,200 km", "  The king of  Paris was"]

#: planted special ids: GPT-2's <|endoftext|> is its eos/unk (and pad, as no pad is set); the Llama-style
#: tokenizer: <unk> <s> </s> = 0 1 2 with </s> as pad; the WordPiece list's order; fairseq's Dictionary
#: <s> <pad> </s> <unk> = 0 1 2 3 with </s> leading every sentence
SPECIAL = {
    "gpt2": {"pad_id": 50256, "eos_id": 50256, "unk_id": 50256, "mask_id": None},
    "llama": {"pad_id": 2, "bos_id": 1, "eos_id": 2, "unk_id": 0, "mask_id": None},
    "bert": {"pad_id": 0, "bos_id": None, "eos_id": None, "unk_id": 1, "mask_id": 4},
    "fairseq": {"pad_id": 1, "bos_id": 2, "eos_id": 2, "unk_id": 3, "mask_id": None},
}


def surface(piece: str) -> str:
    """A token's text as it appears in the input: no surrounding space, no WordPiece ``##``, lowercased."""
    return piece.strip().removeprefix("##").lower()


def added_tokens(with_bos: list[int], bare: list[int]) -> tuple[int, int]:
    """(leading, trailing) count of the special tokens ``add_bos`` puts around the bare ids."""
    for k in range(len(with_bos) - len(bare) + 1):
        if with_bos[k : k + len(bare)] == bare:
            return k, len(with_bos) - len(bare) - k
    raise AssertionError(f"{bare} is not inside {with_bos}")


@pytest.mark.parametrize("text", TEXTS)
def test_vocab_offsets_cut_out_each_token(text_adapter, text):
    """``vocab.tokenize_with_offsets``: the ids of ``vocab.tokenize``; the span cut out of the text reproduces
    each token's own text (``id_to_token``; unknown tokens aside); spans in order within the text; tokens
    added by ``add_bos`` get (0, 0) and the others the same spans as without them."""
    vocab = text_adapter.vocab
    ids, spans = vocab.tokenize_with_offsets(text)
    bare, bare_spans = vocab.tokenize_with_offsets(text, add_bos=False)
    assert ids == vocab.tokenize(text) and bare == vocab.tokenize(text, add_bos=False)
    assert len(spans) == len(ids) and len(bare_spans) == len(bare) > 0
    lead, trail = added_tokens(ids, bare)
    assert spans[lead : len(ids) - trail] == bare_spans
    assert all(span == (0, 0) for span in spans[:lead] + spans[len(ids) - trail :])
    start = 0
    for i, (a, b) in zip(bare, bare_spans, strict=True):
        assert start <= a < b <= len(text), (a, b)
        start = a
        piece = surface(vocab.id_to_token([i])[0])
        # a lone word-boundary piece (Metaspace "▁") has no text; the one the tokenizer prepends where the
        # text has no space gets the next character's span
        if i != vocab.unk_id and piece:
            assert piece == surface(text[a:b]), (i, text[a:b])


#: planted tokenizations: (text, ids or None, id_to_token, spans) with add_bos
PLANTED = {
    "gpt2": ("Hello, world! 1,200 km", [15496, 11, 995, 0, 352, 11, 2167, 10571],
             ["Hello", ",", " world", "!", " 1", ",", "200", " km"],
             [(0, 5), (5, 6), (6, 12), (12, 13), (13, 15), (15, 16), (16, 19), (19, 22)]),
    "llama": ("The capital of France is", None, ["<s>", "The", "capital", "of", "France", "is"],
              [(0, 0), (0, 3), (3, 11), (11, 14), (14, 21), (21, 24)]),
    "bert": ("The capital of London, Hello!", [2, 5, 6, 7, 11, 12, 13, 15, 14, 3],
             ["[CLS]", "the", "capital", "of", "lon", "##don", ",", "hello", "!", "[SEP]"],
             [(0, 0), (0, 3), (4, 11), (12, 14), (15, 18), (18, 21), (21, 22), (23, 28), (28, 29), (0, 0)]),
    "fairseq": ("  The king of  Paris was", None, ["</s>", "The", "king", "of", "Paris", "was"],
                [(0, 0), (2, 5), (6, 10), (11, 13), (15, 20), (21, 24)]),
}


def test_vocab_planted_tokenizations(text_adapter):
    """Planted ids (the real GPT-2 BPE ids; the WordPiece list's order), ``id_to_token`` strings and character
    spans of one sentence per tokenizer; the Llama-style tokens are the Metaspace pieces, fairseq's ids the
    dictionary's."""
    vocab = text_adapter.vocab
    text, want_ids, want_tokens, want_spans = PLANTED[text_adapter.family]
    ids, spans = vocab.tokenize_with_offsets(text)
    if want_ids is not None:
        assert ids == want_ids
    if text_adapter.family == "llama":
        pieces = ["<s>", "▁The", "▁capital", "▁of", "▁France", "▁is"]
        assert text_adapter.tokenizer.convert_ids_to_tokens(ids) == pieces
    if is_fairseq(text_adapter):
        d = text_adapter.model.decoder.dictionary
        assert ids == [d.eos(), *(d.index(w) for w in text.split())]
    assert vocab.id_to_token(ids) == want_tokens
    assert spans == want_spans


def test_vocab_special_ids(text_adapter):
    """pad / bos / eos / unk / mask ids vs the planted ids of each tokenizer (GPT-2's bos: the bos test)."""
    vocab = text_adapter.vocab
    for name, want in SPECIAL[text_adapter.family].items():
        assert getattr(vocab, name) == want, name


def test_vocab_bos_id_is_what_tokenize_puts_first(text_adapter):
    """``bos_id`` is documented as the id ``tokenize`` puts first with ``add_bos`` (None when there is none):
    checked against what ``tokenize`` does (GPT-2 names <|endoftext|> as BOS but never prepends it)."""
    vocab = text_adapter.vocab
    text = "The capital of France is"
    first, bare_first = vocab.tokenize(text)[0], vocab.tokenize(text, add_bos=False)[0]
    if vocab.bos_id is None:
        assert first == bare_first or first in vocab.special_ids
    else:
        assert first == vocab.bos_id != bare_first


#: (text, detokenize(tokenize(text)))
ROUND_TRIP = {
    "gpt2": ("Hello, world! 1,200 km", "Hello, world! 1,200 km"),
    "llama": ("The capital of France is", "<s> The capital of France is"),
    "bert": ("The capital of London, Hello!", "[CLS] the capital of london, hello! [SEP]"),
    "fairseq": (" The old city was built in 1900 . ", "The old city was built in 1900 ."),
}
#: (a word that is one vocabulary entry, a word that is none)
ENTRIES = {"gpt2": (" world", " zyzzyva"), "llama": ("capital", "zyzzyva"), "bert": ("paris", "zyzzyva"),
           "fairseq": ("city", "zyzzyva")}


def test_vocab_detokenize_token_to_id_and_tokens(text_adapter):
    """``detokenize`` of ``tokenize`` vs planted text (fairseq: without its leading </s> and padding);
    ``token_to_id`` of a vocabulary entry vs its tokenization and back; ``tokens`` is ``id_to_token`` of
    every id 0..size-1."""
    fam = text_adapter.family
    vocab = text_adapter.vocab
    text, want = ROUND_TRIP[fam]
    assert vocab.detokenize(vocab.tokenize(text) + ([vocab.pad_id] if fam == "fairseq" else [])) == want
    entry, other = ENTRIES[fam]  # other: unknown to fairseq's dictionary
    assert vocab.token_to_id(entry) == vocab.tokenize(entry, add_bos=False)[0]
    assert vocab.id_to_token([vocab.token_to_id(entry)]) == [entry]
    if fam == "fairseq":
        d = text_adapter.model.decoder.dictionary
        assert vocab.token_to_id(entry) == d.index(entry)
        assert vocab.tokenize(f"{other} city")[1] == d.unk()
        assert vocab.tokenize("city", add_bos=False) == [d.index("city")]
    if fam != "gpt2":  # 50257 GPT-2 tokens: sampled below
        tokens = vocab.tokens
        assert len(tokens) == vocab.size == text_adapter.vocab_size
        assert tokens == vocab.id_to_token(range(vocab.size))
    sample = [0, 1, vocab.size // 2, vocab.size - 1]
    assert [vocab.tokens[i] for i in sample] == vocab.id_to_token(sample)


def test_vocab_token_to_id_of_a_non_entry_is_none(text_adapter):
    """``token_to_id`` of a word that is no vocabulary entry is None (documented), also where the tokenizer
    maps it to one unknown-token id (WordPiece's [UNK])."""
    assert text_adapter.vocab.token_to_id(ENTRIES[text_adapter.family][1]) is None


def test_vocab_without_a_tokenizer(adapter):
    """The tiny HF models have no tokenizer: the vocabulary still has vocab_size ids and the config's pad id,
    and tokenizing is a one-line error; fairseq's comes from its dictionary."""
    vocab = adapter.vocab
    assert len(vocab) == adapter.vocab_size
    if is_fairseq(adapter):
        assert vocab.pad_id == adapter.model.decoder.dictionary.pad()
        return
    assert vocab.pad_id == adapter.model.config.pad_token_id == (1 if "roberta" in adapter.family else 0)
    with pytest.raises(ModelError, match="no tokenizer"):
        vocab.tokenize("The capital")
