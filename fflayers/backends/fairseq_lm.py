"""fairseq transformer language models (``transformer_lm*``) behind :class:`~fflayers.backends.base.LMAdapter`.

Covers plain ``transformer_lm`` (full softmax), the adaptive-input / adaptive-softmax WikiText-103 models
(``transformer_lm_wiki103``), pre-LN (``decoder_normalize_before``) and post-LN blocks, with or without a
final LayerNorm, and old checkpoints (``args`` Namespace, fused attention weights).

Conventions: the input is ``</s> w1 .. wn`` (fairseq's end-of-sentence symbol doubles as the start symbol);
the hidden state at position t predicts token t+1, exactly as ``fairseq-eval-lm --sample-break-mode eos``
scores a line.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fflayers.backends.base import AdapterError, AttentionWeights, HookSite, LMAdapter
from fflayers.backends.checkpoints import load_checkpoint, upgrade_checkpoint

# fairseq's speech tasks log an install hint for tensorboardX when fairseq is imported; irrelevant to LMs
logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)

__all__ = ["FairseqLMAdapter", "load_fairseq_lm", "find_checkpoint"]

_NUMBER_SEP = re.compile(r"^(\d+)([,.]\d+)+$")


def _wikitext_numbers(token: str) -> list[str]:
    """``1,200`` -> ``1 @,@ 200`` and ``3.5`` -> ``3 @.@ 5`` (WikiText's number splitting)."""
    if not _NUMBER_SEP.match(token):
        return [token]
    out: list[str] = []
    for piece in re.split(r"([,.])", token):
        out.append(f"@{piece}@" if piece in {",", "."} else piece)
    return out


class FairseqLMAdapter(LMAdapter):
    """A fairseq ``TransformerLanguageModel`` opened up.

    Hook points live on fairseq's ``TransformerDecoderLayer`` modules, whose tensors are time-first
    (the hook machinery hands them over batch-first):

    * ``resid_pre``: layer input; ``attn_out``: ``self_attn`` output (before dropout and the residual add);
    * ``mlp_key``: ``fc1`` output (pre-activation); ``mlp_coef``: ``fc2`` input (after the activation);
      ``mlp_out``: ``fc2`` output (bias included);
    * ``resid_post``: layer output.

    Pre-LN blocks (``normalize_before``, e.g. the WikiText-103 model): with ``resid_mid = resid_pre + attn_out``,
    ``mlp_key = fc1(LN(resid_mid))`` and ``resid_post = resid_mid + mlp_out``. Post-LN blocks (plain
    ``transformer_lm`` default): ``resid_mid = LN1(resid_pre + attn_out)``, ``mlp_key = fc1(resid_mid)``
    and ``resid_post = LN2(resid_mid + mlp_out)``: the stream leaving the block is normalised.

    ``raw_text=True`` tokenizes untokenized text with Moses (aggressive dash splits, ``a @-@ b``) plus
    WikiText's ``@,@`` / ``@.@`` number splits; the default splits on whitespace (pre-tokenized WikiText).
    """

    family = "fairseq"

    def __init__(self, model: nn.Module, dictionary, device: torch.device | str | None = None, raw_text: bool = False) -> None:
        super().__init__(model, device)
        self.dictionary = dictionary
        self.raw_text = raw_text
        self._moses = None
        self._edge_hooks: list = []
        decoder = model.decoder
        self.decoder = decoder
        self.layers = list(decoder.layers)
        for i, layer in enumerate(self.layers):
            for name in ("fc1", "fc2", "self_attn", "final_layer_norm", "self_attn_layer_norm"):
                if not hasattr(layer, name):
                    raise AdapterError(f"decoder layer {i} ({type(layer).__name__}) has no {name}; it is not a fairseq transformer layer")
        if len(dictionary) != self._output_size():
            raise AdapterError(
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
    @property
    def pad_id(self) -> int:
        return int(self.dictionary.pad())

    @property
    def bos_id(self) -> int | None:
        return int(self.dictionary.eos())

    def words(self, text: str) -> list[str]:
        """The model's word tokens of ``text`` (whitespace split, or Moses when ``raw_text``)."""
        if not self.raw_text:
            return text.split()
        if self._moses is None:
            from sacremoses import MosesTokenizer

            self._moses = MosesTokenizer(lang="en")
        toks = self._moses.tokenize(text, aggressive_dash_splits=True, escape=False)
        return [piece for tok in toks for piece in _wikitext_numbers(tok)]

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.dictionary.index(w) for w in self.words(text)]
        return [self.bos_id, *ids] if add_bos else ids

    def tokenize_with_offsets(self, text: str, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`tokenize` plus each word's character span, found left to right in ``text``; the leading
        ``</s>`` gets ``(0, 0)``. Moses' ``@-@`` / ``@,@`` / ``@.@`` splits get the span of their character."""
        words = self.words(text)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for word in words:
            for piece in (word, word.strip("@") if len(word) > 2 else word):
                start = text.find(piece, cursor)
                if start >= 0:
                    spans.append((start, start + len(piece)))
                    cursor = start + len(piece)
                    break
            else:  # an escaped or normalised word: an empty span where it would be
                spans.append((cursor, cursor))
        ids = [self.dictionary.index(w) for w in words]
        if add_bos:
            return [self.bos_id, *ids], [(0, 0), *spans]
        return ids, spans

    def id_to_token(self, ids: Sequence[int]) -> list[str]:
        return [self.dictionary[int(i)] for i in ids]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Space-joined tokens without the leading ``</s>`` and padding; WikiText's ``@-@`` / ``@,@`` / ``@.@``
        joins are undone."""
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        text = " ".join(self.id_to_token(ids))
        return re.sub(r" @([-,.])@ ", r"\1", text)

    def token_to_id(self, token: str) -> int | None:
        idx = self.dictionary.indices.get(token)
        return None if idx is None else int(idx)

    # ----- forward -----------------------------------------------------------------------------------------
    def _run_model(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.long().masked_fill(~attention_mask, self.pad_id)
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

        These are the raw projections: fairseq multiplies q by ``scaling = d_head ** -0.5`` inside its forward,
        which is not folded in. Learned extra key/value biases (``add_bias_kv``) are not included.
        """
        attn = self.layers[self.check_layer(layer)].self_attn
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        return AttentionWeights.from_linear(
            q.weight, k.weight, v.weight, o.weight, q.bias, k.bias, v.bias, o.bias,
            n_heads=int(attn.num_heads), n_kv_heads=int(attn.num_heads),
        )

    @torch.no_grad()
    def output_embeddings(self) -> torch.Tensor:
        """``[V, d]`` in dictionary order: ``h @ E.T`` are the output logits of a final hidden state ``h`` (after
        the final LayerNorm, if any; ``project_out_dim`` is folded in).

        Full softmax: ``output_projection.weight`` (the input embedding when shared). Adaptive softmax: the head's
        word rows for the first ``cutoff[0]`` tokens, then for each tail band its output linear times its
        projection (``W_out @ W_proj``): the band's logits within its cluster are ``h @ E[band].T``; its
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
                    raise AdapterError(f"adaptive softmax tail {i} predicts {band.shape[0]} tokens, "
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
            raise AdapterError(f"unknown hook point {point!r}; choose from {', '.join(sites)}")
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
                raise AdapterError("edge blocking supports plain causal self-attention only (no bias_kv / zero_attn)")
            self._edge_hooks.append(attn.register_forward_hook(_blocked_attention_hook, with_kwargs=True, prepend=True))


def _adaptive_log_probs(asm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-probs ``[N, V]`` of fairseq's ``AdaptiveSoftmax`` (eval mode), computed out of place.

    Same values as ``AdaptiveSoftmax.get_log_prob`` (head: log-softmax over the head words and one entry per
    tail cluster; tail word = its cluster's head log-prob + log-softmax within the cluster), but without
    its in-place writes, so that gradients flow back to ``x``.
    """
    head = F.log_softmax(asm.head(x).float(), dim=-1)
    n_head = asm.cutoff[0]
    parts = [head[:, :n_head]]
    for i, tail in enumerate(asm.tail):
        parts.append(F.log_softmax(tail(x).float(), dim=-1) + head[:, n_head + i, None])
    return torch.cat(parts, dim=-1).to(x.dtype)


def _linear_map(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` matrix of a bias-free linear module: ``nn.Linear``, fairseq's ``TiedLinear`` (which may
    apply its weight transposed) or an ``nn.Sequential`` of those and dropouts (identity in eval mode)."""
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
            raise AdapterError("an adaptive softmax module holds no linear map")
        return matrix
    if isinstance(module, TiedLinear):
        return module.weight.t() if module.transpose else module.weight
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            raise AdapterError("an adaptive softmax / output projection with a bias is not supported")
        return module.weight
    raise AdapterError(f"cannot read the output embedding from a {type(module).__name__} module")


def _adaptive_head_words(head: nn.Module, n_words: int) -> torch.Tensor:
    """``[cutoff[0], d]``: the rows of the adaptive-softmax head that score the head-band words (the remaining
    rows score the tail clusters). Tied heads (``TiedHeadModule``) keep them in ``word_proj``."""
    from fairseq.modules.adaptive_softmax import TiedHeadModule

    words = _linear_map(head.word_proj) if isinstance(head, TiedHeadModule) else _linear_map(head)[:n_words]
    if words.shape[0] != n_words:
        raise AdapterError(f"adaptive softmax head scores {words.shape[0]} words, expected {n_words}")
    return words


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _blocked_attention_hook(module, args, kwargs, output):
    """Recompute fairseq ``MultiheadAttention`` self-attention with the blocked edges removed."""
    from fflayers.hooks import attention_with_blocked_edges, blocked_edges

    blocked = blocked_edges(module)
    if blocked is None:
        return None
    if _arg(args, kwargs, 4, "incremental_state") is not None:
        raise AdapterError("edge blocking does not support incremental decoding; run the full sequence")
    query = _arg(args, kwargs, 0, "query")  # [T, B, C]
    key_padding_mask = _arg(args, kwargs, 3, "key_padding_mask")  # [B, S], True = pad
    attn_mask = _arg(args, kwargs, 7, "attn_mask")  # [T, S] additive (0 / -inf) or bool (True = masked)
    T, B, C = query.shape
    H, Dh = module.num_heads, module.head_dim

    def heads(x: torch.Tensor) -> torch.Tensor:  # [T, B, C] -> [B, H, T, Dh]
        return x.reshape(x.shape[0], B, H, Dh).permute(1, 2, 0, 3)

    q = heads(module.q_proj(query) * module.scaling)
    k = heads(module.k_proj(query))
    v = heads(module.v_proj(query))
    scores = q @ k.transpose(-1, -2)  # [B, H, T, S]
    allowed = torch.ones(T, T, dtype=torch.bool, device=query.device)[None, None]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & ~attn_mask[None, None]
        else:
            finite = torch.isfinite(attn_mask)
            allowed = allowed & finite[None, None]
            scores = scores + torch.where(finite, attn_mask, torch.zeros_like(attn_mask)).to(scores.dtype)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.bool()[:, None, None, :]
    ctx = attention_with_blocked_edges(scores, allowed, blocked.to(query.device), v)  # [B, H, T, Dh]
    out = module.out_proj(ctx.permute(2, 0, 1, 3).reshape(T, B, C))
    return (out, None) if isinstance(output, tuple) else out


# ----- loading -----------------------------------------------------------------------------------------------


def find_checkpoint(model_dir: str | Path, checkpoint: str | None = None) -> Path:
    """The checkpoint file of a model dir: ``checkpoint`` if given (name in the dir or a path), else
    ``model.pt``, else ``checkpoint_best.pt``, else ``checkpoint_last.pt``, else the only ``checkpoint*.pt``."""
    model_dir = Path(model_dir)
    if checkpoint is not None:
        path = Path(checkpoint)
        path = path if path.is_absolute() or path.exists() else model_dir / checkpoint
        if not path.is_file():
            raise AdapterError(f"checkpoint {path} does not exist; pass a file name inside {model_dir} or a path")
        return path
    for name in ("model.pt", "checkpoint_best.pt", "checkpoint_last.pt"):
        if (model_dir / name).is_file():
            return model_dir / name
    found = sorted(model_dir.glob("checkpoint*.pt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise AdapterError(f"no checkpoint in {model_dir}: expected model.pt or checkpoint_*.pt")
    names = ", ".join(p.name for p in found[:5])
    raise AdapterError(f"several checkpoints in {model_dir} ({names}); pass checkpoint= to choose one")


def _build_model(state: dict, dict_path: Path):
    """Build fairseq's task + model from an upgraded checkpoint state and load the weights strictly."""
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY, build_model
    from fairseq.tasks.language_modeling import LanguageModelingTask
    from omegaconf import open_dict

    cfg = state["cfg"]
    model_cfg = cfg.get("model") if "model" in cfg else None
    arch = None if model_cfg is None else (getattr(model_cfg, "_name", None) or getattr(model_cfg, "arch", None))
    if arch is None or ARCH_MODEL_NAME_REGISTRY.get(arch, arch) != "transformer_lm":
        raise AdapterError(f"checkpoint model is {arch!r}, not a fairseq transformer LM (transformer_lm*); use a language-model checkpoint")
    with open_dict(cfg):
        cfg.task.data = str(dict_path.parent)
        for flag in ("checkpoint_activations", "offload_activations"):
            if getattr(cfg.model, flag, False):
                setattr(cfg.model, flag, False)
    dictionary = Dictionary.load(str(dict_path))
    output_size = getattr(cfg.task, "output_dictionary_size", -1)
    if output_size is not None and output_size >= 0:
        raise AdapterError("checkpoints trained with --output-dictionary-size are not supported; retrain without it")
    task = LanguageModelingTask(cfg.task, dictionary, dictionary)
    try:
        model = build_model(cfg.model, task)
    except Exception as e:  # fairseq raises assorted errors for configs it cannot build
        raise AdapterError(f"fairseq could not build the model from the checkpoint's config: {type(e).__name__}: {str(e)[:150]}") from None
    try:
        model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:200]
        raise AdapterError(
            f"checkpoint weights do not fit the model built from its config (wrong dict.txt?): {first}"
        ) from None
    return model, dictionary


def load_fairseq_lm(
    model_dir: str | Path,
    checkpoint: str | None = None,
    device: torch.device | str | None = None,
    trust_checkpoint: bool = False,
    raw_text: bool = False,
) -> FairseqLMAdapter:
    """Load a fairseq transformer LM from a model dir (``dict.txt`` + ``model.pt`` or ``checkpoint_*.pt``).

    ``trust_checkpoint=True`` allows full unpickling (only for files you trust); by default checkpoints are
    read weights-only with an allow-list (:mod:`fflayers.backends.checkpoints`). ``raw_text=True`` makes
    :meth:`FairseqLMAdapter.tokenize` Moses-tokenize its input.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise AdapterError(f"model dir {model_dir} does not exist; pass a folder holding dict.txt and model.pt")
    dict_path = model_dir / "dict.txt"
    if not dict_path.is_file():
        raise AdapterError(f"{model_dir} has no dict.txt; put the dictionary the model was trained with next to its checkpoint")
    path = find_checkpoint(model_dir, checkpoint)
    state = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = upgrade_checkpoint(state)
        model, dictionary = _build_model(state, dict_path)
    return FairseqLMAdapter(model, dictionary, device=device, raw_text=raw_text)
