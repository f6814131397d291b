"""The HuggingFace backend's architecture table: where each model type keeps its parts, how it is wired.

Every architecture fact the HF adapter, its edge-blocking routes and its loader rely on is a field of
:class:`ArchSpec`; :data:`ARCHITECTURES` maps a ``config.model_type`` to its spec, :func:`arch_spec` looks
one up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from fflayers.core import BLOCK_LAYOUTS, ModelError

__all__ = ["ARCHITECTURES", "ATTN_METHODS", "MLP_KINDS", "QKV_LAYOUTS", "ArchSpec", "arch_spec"]

#: MLP kinds: ``"plain"``: fc_in -> activation -> fc_out; ``"gated"``: act(gate) * up -> down, fc_in = gate
MLP_KINDS: tuple[str, ...] = ("plain", "gated")

#: ``_attn(query, key, value, attention_mask)`` methods fflayers wraps for edge blocking where the attention
#: does not call transformers' attention-function interface: ``"scaled"`` (GPT-J: scores divided by
#: ``scale_attn``, causal + padding in the additive mask); ``"buffer_mask"`` (GPT-Neo: causal / local-window
#: mask in the ``bias`` buffer, padding in the additive mask)
ATTN_METHODS: tuple[str, ...] = ("scaled", "buffer_mask")


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """Module paths and wiring of one architecture; block-relative paths start at a block (``layers[i]``)."""

    layers: str  # the ModuleList of blocks
    embed: str  # token embedding
    final_norm: str | None  # norm applied before the head (None: the head does its own)
    attn: str  # module whose output element 0 is the attention sublayer output (block-relative)
    attn_core: str  # module that computes softmax(QK^T)V (edge blocking; block-relative)
    mlp_in: str  # its input is mlp_in: the whole MLP where it is one module, else fc_in (block-relative)
    fc_in: str  # its output is mlp_key (block-relative)
    fc_out: str  # its input is mlp_coef (block-relative)
    mlp_out: str  # its output is mlp_out (block-relative)
    block_layout: str  # how a block wires its sublayers: one of fflayers.core.BLOCK_LAYOUTS
    parallel_flag: str | None = None  # config attribute (default true) whose false makes "parallel" pre_norm
    mlp: str  # one of MLP_KINDS
    conv1d: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    head: str | None = None  # output head module (None: model.get_output_embeddings())
    head_chain: tuple[str, ...] = ()  # an MLM head computed inline: modules applied in order (DistilBERT)
    masked_lm: bool = False  # a masked-LM encoder (AutoModelForMaskedLM), not a causal LM
    encoder: ArchSpec | None = None  # spec of the same checkpoint loaded without its head (AutoModel)
    body: str | None = None  # attribute holding the body in the model with head; absent: use ``encoder``
    attn_proj: tuple[str, ...] = ()  # q, k, v projections, or the single fused one (block-relative)
    attn_proj_out: str = ""  # attention output projection (block-relative)
    qkv_layout: str = "separate"  # how a fused projection's output features split: a key of QKV_LAYOUTS
    attn_method: str | None = None  # the _attn method edge blocking may wrap (ATTN_METHODS); None: none
    unembed: str | None = None  # module whose weight is the output embedding (None: get_output_embeddings())
    embed_scale: bool = False  # the embedding module multiplies its rows by sqrt(hidden_size) (Gemma)
    positions_after_pad: bool = False  # position ids start at pad_token_id + 1 (RoBERTa): fewer usable ones
    gate_up: bool = False  # fc_in's output is gate | up (fused, Phi-3): mlp_key is its first d_ff features
    logit_softcap: str | None = None  # config attribute c: the model's logits are c * tanh(head(h) / c)
    logit_scale: str | None = None  # config attribute s: the model's logits are s * head(h) (Cohere)

    def __post_init__(self) -> None:
        if self.block_layout not in BLOCK_LAYOUTS:
            raise ModelError(f"ArchSpec.block_layout must be one of {BLOCK_LAYOUTS}, "
                               f"got {self.block_layout!r}")
        if self.mlp not in MLP_KINDS:
            raise ModelError(f"ArchSpec.mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.attn_method is not None and self.attn_method not in ATTN_METHODS:
            raise ModelError(f"ArchSpec.attn_method must be None or one of {ATTN_METHODS}, "
                               f"got {self.attn_method!r}")


_QKVSplit = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, ...]]


def _split_qkv_blocks(w: torch.Tensor, b: torch.Tensor | None, n_heads: int) -> _QKVSplit:
    """GPT-2 ``c_attn``: output features are ``q | k | v``, each ``[n_heads, d_head]`` head-major."""
    return w.chunk(3, dim=0), ((None,) * 3 if b is None else b.chunk(3))


def _split_per_head_qkv(w: torch.Tensor, b: torch.Tensor | None, n_heads: int) -> _QKVSplit:
    """GPT-NeoX ``query_key_value``: output features are ``[n_heads, 3, d_head]`` (q, k, v interleaved per
    head; the model views the output as ``[..., n_heads, 3 * d_head]`` and chunks the last axis in three)."""
    d = w.shape[1]
    w3 = w.reshape(n_heads, 3, -1, d)
    ws = tuple(w3[:, i].reshape(-1, d) for i in range(3))
    bs = (None,) * 3 if b is None else tuple(b.reshape(n_heads, 3, -1)[:, i].reshape(-1) for i in range(3))
    return ws, bs


def _split_query_then_kv(w: torch.Tensor, b: torch.Tensor | None, n_heads: int) -> _QKVSplit:
    """Phi-3 ``qkv_proj``: blocks ``q | k | v``, q ``d`` wide and k, v of equal width (grouped-query heads:
    narrower than q)."""
    d = w.shape[1]
    sizes = (d, (w.shape[0] - d) // 2, (w.shape[0] - d) // 2)
    return w.split(sizes, dim=0), ((None,) * 3 if b is None else b.split(sizes))


def _split_bigcode(w: torch.Tensor, b: torch.Tensor | None, n_heads: int) -> _QKVSplit:
    """GPT-BigCode ``c_attn``: multi-query ``q | k | v`` blocks with k and v one head each (the
    ``[d + 2 * d_head, d]`` weight); without multi-query (``[3 * d, d]``) GPT-NeoX's per-head layout."""
    if w.shape[0] == 3 * w.shape[1]:
        return _split_per_head_qkv(w, b, n_heads)
    return _split_query_then_kv(w, b, n_heads)


#: fused q/k/v projection layouts: name -> split of the ``nn.Linear``-layout weight ``[out, d]`` and bias
QKV_LAYOUTS = {"qkv_blocks": _split_qkv_blocks, "per_head_qkv": _split_per_head_qkv,
               "query_then_kv": _split_query_then_kv, "bigcode": _split_bigcode}


_GPT2 = ArchSpec(
    layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
    attn="attn", attn_core="attn", mlp_in="mlp", fc_in="mlp.c_fc", fc_out="mlp.c_proj", mlp_out="mlp",
    block_layout="pre_norm", mlp="plain", conv1d=True,
    attn_proj=("attn.c_attn",), attn_proj_out="attn.c_proj", qkv_layout="qkv_blocks",
)
#: GPT-2's block with nn.Linear projections and a fused multi-query c_attn (StarCoder, SantaCoder)
_GPT_BIGCODE = replace(_GPT2, conv1d=False, qkv_layout="bigcode")
_GPT_NEO = ArchSpec(
    layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
    attn="attn", attn_core="attn.attention", mlp_in="mlp", fc_in="mlp.c_fc", fc_out="mlp.c_proj",
    mlp_out="mlp", block_layout="pre_norm", mlp="plain",
    attn_proj=("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"),
    attn_proj_out="attn.attention.out_proj", attn_method="buffer_mask",
)
_GPTJ = ArchSpec(
    layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
    attn="attn", attn_core="attn", mlp_in="mlp", fc_in="mlp.fc_in", fc_out="mlp.fc_out", mlp_out="mlp",
    block_layout="parallel", mlp="plain",
    attn_proj=("attn.q_proj", "attn.k_proj", "attn.v_proj"), attn_proj_out="attn.out_proj",
    attn_method="scaled",
)
_GPT_NEOX = ArchSpec(
    layers="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
    attn="attention", attn_core="attention", mlp_in="mlp", fc_in="mlp.dense_h_to_4h",
    fc_out="mlp.dense_4h_to_h", mlp_out="mlp",
    block_layout="parallel", parallel_flag="use_parallel_residual", mlp="plain",
    attn_proj=("attention.query_key_value",), attn_proj_out="attention.dense", qkv_layout="per_head_qkv",
)
_LLAMA = ArchSpec(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    attn="self_attn", attn_core="self_attn", mlp_in="mlp", fc_in="mlp.gate_proj", fc_out="mlp.down_proj",
    mlp_out="mlp", block_layout="pre_norm", mlp="gated",
    attn_proj=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_proj_out="self_attn.o_proj",
)
#: Llama's paths with a parallel block where the config says so (StableLM: ``use_parallel_residual``)
_STABLELM = replace(_LLAMA, block_layout="parallel", parallel_flag="use_parallel_residual")
#: Llama's paths with a plain MLP (``c_fc`` -> activation -> ``c_proj``)
_STARCODER2 = replace(_LLAMA, fc_in="mlp.c_fc", fc_out="mlp.c_proj", mlp="plain")
#: Llama's paths, token embeddings scaled by sqrt(d) inside the embedding module
_GEMMA = replace(_LLAMA, embed_scale=True)
#: Gemma's paths with a norm after each sublayer (attn_out / mlp_out: what is added, after it) and
#: soft-capped logits (Gemma 2; Gemma 3 also has per-head q/k norms)
_GEMMA2 = replace(_GEMMA, attn="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
                  block_layout="sandwich", logit_softcap="final_logit_softcapping")
#: Llama's paths with the norms after the sublayers instead of before them (OLMo 2: attention and MLP read
#: the stream itself; q/k norms over all heads at once)
_OLMO2 = replace(_LLAMA, attn="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
                 block_layout="sandwich")
#: Llama's paths in a parallel block with one norm, logits scaled by ``logit_scale`` (Cohere Command R)
_COHERE = replace(_LLAMA, block_layout="parallel", logit_scale="logit_scale")
#: a parallel block with one LayerNorm shared by attention and MLP, a plain MLP (Phi-1, Phi-1.5, Phi-2)
_PHI = replace(_LLAMA, final_norm="model.final_layernorm", fc_in="mlp.fc1", fc_out="mlp.fc2",
               block_layout="parallel", mlp="plain", attn_proj_out="self_attn.dense")
#: Llama's layout with a fused q | k | v projection and a fused gate | up projection (Phi-3, Phi-4)
_PHI3 = replace(_LLAMA, fc_in="mlp.gate_up_proj", gate_up=True, attn_proj=("self_attn.qkv_proj",),
                qkv_layout="query_then_kv")
#: BERT checkpoints without an MLM head (encoders such as sentence-transformers models) load as BertModel,
#: whose paths have no ``bert.`` prefix.
_BERT_ENCODER = ArchSpec(
    layers="encoder.layer", embed="embeddings.word_embeddings", final_norm=None,
    attn="attention.output.dense", attn_core="attention.self", mlp_in="intermediate.dense",
    fc_in="intermediate.dense", fc_out="output.dense", mlp_out="output.dense",
    block_layout="post_norm", mlp="plain", head=None, masked_lm=True,
    attn_proj=("attention.self.query", "attention.self.key", "attention.self.value"),
    attn_proj_out="attention.output.dense",
)
_BERT = ArchSpec(
    layers="bert.encoder.layer", embed="bert.embeddings.word_embeddings", final_norm=None,
    attn="attention.output.dense", attn_core="attention.self", mlp_in="intermediate.dense",
    fc_in="intermediate.dense", fc_out="output.dense", mlp_out="output.dense",
    block_layout="post_norm", mlp="plain", head="cls", masked_lm=True, encoder=_BERT_ENCODER, body="bert",
    attn_proj=_BERT_ENCODER.attn_proj, attn_proj_out=_BERT_ENCODER.attn_proj_out,
    unembed="cls.predictions.decoder",
)
#: BERT's blocks under ``roberta.``; the MLM head ``lm_head`` (dense, GELU, LayerNorm, decoder + bias)
_ROBERTA = replace(
    _BERT, layers="roberta.encoder.layer", embed="roberta.embeddings.word_embeddings", head="lm_head",
    body="roberta", unembed="lm_head.decoder", positions_after_pad=True,
)

#: DistilBERT: post-norm blocks, one attention module with q/k/v/out projections; its MLM head is computed
#: inline by the model class (transform, activation, LayerNorm, projector), so it is a chain of modules
_DISTILBERT_ENCODER = ArchSpec(
    layers="transformer.layer", embed="embeddings.word_embeddings", final_norm=None,
    attn="attention", attn_core="attention", mlp_in="ffn", fc_in="ffn.lin1", fc_out="ffn.lin2", mlp_out="ffn",
    block_layout="post_norm", mlp="plain", masked_lm=True,
    attn_proj=("attention.q_lin", "attention.k_lin", "attention.v_lin"), attn_proj_out="attention.out_lin",
)
_DISTILBERT = replace(
    _DISTILBERT_ENCODER, layers="distilbert.transformer.layer", embed="distilbert.embeddings.word_embeddings",
    head_chain=("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
    encoder=_DISTILBERT_ENCODER, body="distilbert", unembed="vocab_projector",
)

#: model_type -> where its parts live.
ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": _GPT2,
    "gpt_neo": _GPT_NEO,
    "gpt_bigcode": _GPT_BIGCODE,
    "gptj": _GPTJ,
    "gpt_neox": _GPT_NEOX,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    # Llama's layout: q/k/v biases (qwen2), q/k norms (qwen3), non-parametric LayerNorm and clipped q/k/v
    # (olmo), layers without rotary positions (smollm3)
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "olmo": _LLAMA,
    "olmo2": _OLMO2,
    "smollm3": _LLAMA,
    "gemma": _GEMMA,
    "cohere": _COHERE,
    "gemma2": _GEMMA2,
    # Gemma 2's block and paths, with per-head q/k norms and a rotary base per layer type (Gemma 3 text)
    "gemma3_text": _GEMMA2,
    "phi": _PHI,
    "phi3": _PHI3,
    "stablelm": _STABLELM,
    "starcoder2": _STARCODER2,
    "bert": _BERT,
    "roberta": _ROBERTA,
    "distilbert": _DISTILBERT,
    "xlm-roberta": _ROBERTA,
}


def arch_spec(model_type: str | None, model: nn.Module | None = None) -> ArchSpec:
    """The spec of ``model_type``; with the loaded ``model``, the ``encoder`` spec where the model has no
    ``body`` (loaded without its head). Unknown types: :class:`ModelError` naming the supported ones."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unsupported architecture {model_type!r}; supported: {supported}")
    if model is not None and spec.encoder is not None and spec.body and not hasattr(model, spec.body):
        return spec.encoder
    return spec
