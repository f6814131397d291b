"""fairseq transformer language models (``transformer_lm*``) behind
:class:`~fflayers.backends.base.LMAdapter`; loading a model dir: :mod:`fflayers.backends.fairseq_loading`.

Covers plain ``transformer_lm`` (full softmax), the adaptive-input / adaptive-softmax WikiText-103 models
(``transformer_lm_wiki103``), pre-LN (``decoder_normalize_before``) and post-LN blocks, with or without a
final LayerNorm, and old checkpoints (``args`` Namespace, fused attention weights).

Conventions: the input is ``</s> w1 .. wn`` (fairseq's end-of-sentence symbol doubles as the start symbol);
the hidden state at position t predicts token t+1, exactly as ``fairseq-eval-lm --sample-break-mode eos``
scores a line.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fflayers.backends.base import AttentionWeights, LMAdapter
from fflayers.backends.fairseq_attention import blocked_attention_hook
from fflayers.backends.fairseq_vocab import FairseqVocabulary
from fflayers.core import HookSite, ModelError

# fairseq's speech tasks log an install hint for tensorboardX when fairseq is imported; irrelevant to LMs
logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)

__all__ = ["FairseqLMAdapter"]

class FairseqLMAdapter(LMAdapter):
    """A fairseq ``TransformerLanguageModel`` opened up.

    Hook points live on fairseq's ``TransformerDecoderLayer`` modules, whose tensors are time-first
    (the hook machinery hands them over batch-first):

    * ``resid_pre``: layer input; ``attn_out``: ``self_attn`` output (before dropout and the residual add);
    * ``mlp_key``: ``fc1`` output (pre-activation); ``mlp_coef``: ``fc2`` input (after the activation);
      ``mlp_out``: ``fc2`` output (bias included);
    * ``resid_post``: layer output.

    Pre-LN blocks (``normalize_before``, e.g. the WikiText-103 model): with
    ``resid_mid = resid_pre + attn_out``, ``mlp_key = fc1(LN(resid_mid))`` and
    ``resid_post = resid_mid + mlp_out``. Post-LN blocks (plain
    ``transformer_lm`` default): ``resid_mid = LN1(resid_pre + attn_out)``, ``mlp_key = fc1(resid_mid)``
    and ``resid_post = LN2(resid_mid + mlp_out)``: the stream leaving the block is normalised.

    ``raw_text=True`` tokenizes untokenized text with Moses (aggressive dash splits, ``a @-@ b``) plus
    WikiText's ``@,@`` / ``@.@`` number splits; the default splits on whitespace (pre-tokenized WikiText).
    """

    family = "fairseq"

    def __init__(self, model: nn.Module, dictionary, device: torch.device | str | None = None,
                 raw_text: bool = False) -> None:
        super().__init__(model, device)
        self.dictionary = dictionary
        self.raw_text = raw_text
        self._edge_hooks: list = []
        decoder = model.decoder
        self.decoder = decoder
        self.layers = list(decoder.layers)
        for i, layer in enumerate(self.layers):
            for name in ("fc1", "fc2", "self_attn", "final_layer_norm", "self_attn_layer_norm"):
                if not hasattr(layer, name):
                    raise ModelError(f"decoder layer {i} ({type(layer).__name__}) has no {name}; "
                                       "it is not a fairseq transformer layer")
        if len(dictionary) != self._output_size():
            raise ModelError(
                f"dict.txt has {len(dictionary)} symbols but the model predicts {self._output_size()}; "
                "use the dict.txt that came with the checkpoint"
            )

    # ----- sizes -------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.decoder.embed_dim)

    @property
    def d_ff(self) -> int:
        return int(self.layers[0].fc1.out_features)

    @property
    def vocab_size(self) -> int:
        return len(self.dictionary)

    @property
    def max_positions(self) -> int | None:
        n = self.decoder.max_positions()
        return int(n) if n is not None else None

    @property
    def normalize_before(self) -> bool:
        """True for pre-LN blocks."""
        return bool(self.layers[0].normalize_before)

    @property
    def is_adaptive(self) -> bool:
        """True when the output head is an adaptive softmax."""
        return self.decoder.adaptive_softmax is not None

    def _output_size(self) -> int:
        dec = self.decoder
        if dec.adaptive_softmax is not None:
            return int(dec.adaptive_softmax.vocab_size)
        return int(dec.output_projection.weight.shape[0])

    # ----- text --------------------------------------------------------------------------------------------
    def _make_vocab(self) -> FairseqVocabulary:
        return FairseqVocabulary(self.dictionary, self.raw_text)

    # ----- forward -----------------------------------------------------------------------------------------
    def _run_model(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.long().masked_fill(~attention_mask, self.vocab.pad_id)
        with warnings.catch_warnings():
            # fairseq passes a float causal mask with a bool padding mask to torch's attention
            warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
            _, extra = self.decoder.extract_features(tokens, encoder_out=None)
        return extra["inner_states"][-1].transpose(0, 1)

    # ----- output head -------------------------------------------------------------------------------------
    def _project_rows(self, h: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        dec = self.decoder
        x = h
        if final_norm and dec.layer_norm is not None:
            x = dec.layer_norm(x)
        if dec.project_out_dim is not None:
            x = dec.project_out_dim(x)
        if dec.adaptive_softmax is not None:
            return _adaptive_log_probs(dec.adaptive_softmax, x)
        return F.log_softmax(dec.output_projection(x).float(), dim=-1).to(x.dtype)

    # ----- weights -----------------------------------------------------------------------------------------
    def ffn_keys(self, layer: int) -> torch.Tensor:
        """``fc1.weight`` ``[d_ff, d]`` (a view: in-place edits change the model)."""
        return self.layers[self.check_layer(layer)].fc1.weight.detach()

    def ffn_values(self, layer: int) -> torch.Tensor:
        """``fc2.weight.T`` ``[d_ff, d]`` (a view: in-place edits change the model)."""
        return self.layers[self.check_layer(layer)].fc2.weight.detach().t()

    @torch.no_grad()
    def input_embeddings(self) -> torch.Tensor:
        """``[V, d]``: what the first block receives for each token, positional embedding excluded.

        Plain models: ``embed_scale * E`` (then ``project_in_dim`` when the input dimension differs).
        Adaptive input: each band's embedding table times its projection to ``d`` (``E_b @ P_b^T``),
        concatenated in vocabulary order, times ``embed_scale`` (``sqrt(d)`` unless ``no_scale_embedding``).
        """
        dec = self.decoder
        emb = dec.embed_tokens
        if hasattr(emb, "embeddings") and hasattr(emb, "cutoff"):
            parts = [band[1](band[0].weight) for band in emb.embeddings]
            table = torch.cat(parts, dim=0)
        else:
            table = emb.weight
        table = table * dec.embed_scale
        if dec.project_in_dim is not None:
            table = dec.project_in_dim(table)
        return table.detach()

    def attention_weights(self, layer: int) -> AttentionWeights:
        """Per-head weights of ``self_attn`` (``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``), views.

        These are the raw projections: fairseq multiplies q by ``scaling = d_head ** -0.5`` inside its
        forward, which is not folded in. Learned extra key/value biases (``add_bias_kv``) are not included.
        """
        attn = self.layers[self.check_layer(layer)].self_attn
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        return AttentionWeights.from_linear(
            q.weight, k.weight, v.weight, o.weight, q.bias, k.bias, v.bias, o.bias,
            n_heads=int(attn.num_heads), n_kv_heads=int(attn.num_heads),
        )

    @torch.no_grad()
    def output_embeddings(self) -> torch.Tensor:
        """``[V, d]`` in dictionary order: ``h @ E.T`` are the output logits of a final hidden state ``h``
        (after the final LayerNorm, if any; ``project_out_dim`` is folded in).

        Full softmax: ``output_projection.weight`` (the input embedding when shared). Adaptive softmax: the
        head's word rows for the first ``cutoff[0]`` tokens, then for each tail band its output linear times
        its projection (``W_out @ W_proj``): the band's logits within its cluster are ``h @ E[band].T``; its
        tokens' log-probs add the head's cluster score, which has no row here.
        """
        dec = self.decoder
        asm = dec.adaptive_softmax
        if asm is not None:
            n_head = int(asm.cutoff[0])
            parts = [_adaptive_head_words(asm.head, n_head)]
            for i, tail in enumerate(asm.tail):
                band = _linear_map(tail)
                if band.shape[0] != asm.cutoff[i + 1] - asm.cutoff[i]:
                    raise ModelError(f"adaptive softmax tail {i} predicts {band.shape[0]} tokens, "
                                       f"expected {asm.cutoff[i + 1] - asm.cutoff[i]}")
                parts.append(band)
            table = torch.cat(parts, dim=0)
        else:
            table = dec.output_projection.weight
        if dec.project_out_dim is not None:
            table = table @ _linear_map(dec.project_out_dim)
        return table.detach()

    @property
    def output_embeddings_kind(self) -> str:
        dec = self.decoder
        if dec.adaptive_softmax is not None:
            return "adaptive softmax: head rows + tail projections"
        out, emb = dec.output_projection.weight, getattr(dec.embed_tokens, "weight", None)
        tied = emb is not None and (out is emb or out.data_ptr() == emb.data_ptr())
        return "tied input/output embedding" if tied else "output embedding (untied)"

    # ----- hooks -------------------------------------------------------------------------------------------
    def hook_site(self, point: str, layer: int) -> HookSite:
        block = self.layers[self.check_layer(layer)]
        sites = {
            "resid_pre": (block, "input"),
            "attn_in": (block.self_attn, "input"),
            "attn_out": (block.self_attn, "output"),
            "mlp_in": (block.fc1, "input"),
            "mlp_key": (block.fc1, "output"),
            "mlp_coef": (block.fc2, "input"),
            "mlp_out": (block.fc2, "output"),
            "resid_post": (block, "output"),
        }
        if point not in sites:
            raise ModelError(f"unknown hook point {point!r}; choose from {', '.join(sites)}")
        module, side = sites[point]
        return HookSite(module, side, time_first=True, arg_name="query" if module is block.self_attn else
                        "x" if module is block else "input")

    @property
    def block_layout(self) -> str:
        return "pre_norm" if self.normalize_before else "post_norm"

    def attention_module(self, layer: int) -> nn.Module:
        return self.layers[self.check_layer(layer)].self_attn

    def prepare_edge_blocking(self) -> None:
        """Install (once) a hook on every self-attention module that, while an edge mask is set on it by
        :func:`fflayers.hooks.block_attention`, recomputes its output with those edges blocked. The hook is
        prepended, so hooks reading ``attn_out`` see the blocked output."""
        if self._edge_hooks:
            return
        for layer in self.layers:
            attn = layer.self_attn
            if attn.bias_k is not None or attn.add_zero_attn or not attn.self_attention:
                raise ModelError("edge blocking supports plain causal self-attention only "
                                   "(no bias_kv / zero_attn)")
            hook = attn.register_forward_hook(blocked_attention_hook, with_kwargs=True, prepend=True)
            self._edge_hooks.append(hook)


def _adaptive_log_probs(asm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-probs ``[N, V]`` of fairseq's ``AdaptiveSoftmax`` (eval mode), computed out of
    place.

    Same values as ``AdaptiveSoftmax.get_log_prob`` (head: log-softmax over the head words and one entry per
    tail cluster; tail word = its cluster's head log-prob + log-softmax within the cluster), but without
    its in-place writes, so that gradients flow back to ``x``.
    """
    head = F.log_softmax(asm.head(x).float(), dim=-1)
    n_head = asm.cutoff[0]
    if not (torch.is_grad_enabled() and x.requires_grad):  # one output buffer, no concatenated copy
        out = torch.empty(x.shape[0], int(asm.vocab_size), dtype=torch.float32, device=x.device)
        out[:, :n_head] = head[:, :n_head]
        start = n_head
        for i, tail in enumerate(asm.tail):
            part = out[:, start : start + int(asm.cutoff[i + 1]) - int(asm.cutoff[i])]
            torch.add(F.log_softmax(tail(x).float(), dim=-1), head[:, n_head + i, None], out=part)
            start += part.shape[1]
        return out.to(x.dtype)
    parts = [head[:, :n_head]]
    for i, tail in enumerate(asm.tail):
        parts.append(F.log_softmax(tail(x).float(), dim=-1) + head[:, n_head + i, None])
    return torch.cat(parts, dim=-1).to(x.dtype)


def _linear_map(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` matrix of a bias-free linear module: ``nn.Linear``, fairseq's ``TiedLinear`` (which
    may apply its weight transposed) or an ``nn.Sequential`` of those and dropouts (identity in eval mode)."""
    from fairseq.modules.adaptive_softmax import TiedLinear
    from fairseq.modules.fairseq_dropout import FairseqDropout

    if isinstance(module, nn.Sequential):
        matrix = None
        for part in module:
            if isinstance(part, (nn.Dropout, FairseqDropout)):
                continue
            w = _linear_map(part)
            matrix = w if matrix is None else w @ matrix
        if matrix is None:
            raise ModelError("an adaptive softmax module holds no linear map")
        return matrix
    if isinstance(module, TiedLinear):
        return module.weight.t() if module.transpose else module.weight
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            raise ModelError("an adaptive softmax / output projection with a bias is not supported")
        return module.weight
    raise ModelError(f"cannot read the output embedding from a {type(module).__name__} module")


def _adaptive_head_words(head: nn.Module, n_words: int) -> torch.Tensor:
    """``[cutoff[0], d]``: the rows of the adaptive-softmax head that score the head-band words (the remaining
    rows score the tail clusters). Tied heads (``TiedHeadModule``) keep them in ``word_proj``."""
    from fairseq.modules.adaptive_softmax import TiedHeadModule

    words = _linear_map(head.word_proj) if isinstance(head, TiedHeadModule) else _linear_map(head)[:n_words]
    if words.shape[0] != n_words:
        raise ModelError(f"adaptive softmax head scores {words.shape[0]} words, expected {n_words}")
    return words
