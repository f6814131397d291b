"""HuggingFace transformers backend: GPT-2, GPT-Neo, GPT-J, GPT-NeoX/Pythia, Llama-style and BERT (masked LM).

Architectures differ only in where things live and how blocks are wired; the table in
:mod:`fflayers.backends.hf_arch` says it declaratively (module paths relative to the loaded model), so one
adapter class serves them all. Edge blocking lives in :mod:`fflayers.backends.hf_attention`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fflayers.backends.base import AttentionWeights, LMAdapter, resolve_device
from fflayers.backends.hf_arch import QKV_LAYOUTS, ArchSpec, arch_spec
from fflayers.backends.hf_attention import prepare_edge_blocking
from fflayers.backends.hf_placement import (
    dispatched,
    input_device,
    is_offloaded,
    parse_device_map,
    parse_max_memory,
    read_tensor,
)
from fflayers.backends.hf_vocab import HFVocabulary
from fflayers.core import HookSite, InputError, ModelError, StopForward

__all__ = ["HFAdapter", "load_hf_lm"]


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


class HFAdapter(LMAdapter):
    """Adapter over a loaded HuggingFace model (and optionally its tokenizer)."""

    def __init__(self, model: nn.Module, tokenizer=None, device: torch.device | str | None = None,
                 spec: ArchSpec | None = None) -> None:
        model_type = getattr(model.config, "model_type", None)
        if spec is None:
            try:
                spec = arch_spec(model_type, model)
            except ModelError as err:
                raise ModelError(f"{err} (or pass spec=ArchSpec(...) with its module paths)") from None
        placed = dispatched(model)  # a device map: the blocks stay where transformers put them
        super().__init__(model, input_device(model, spec.embed) if placed else device, move=not placed)
        self.family = model_type
        self.spec = spec
        self.tokenizer = tokenizer
        self.is_masked_lm = spec.masked_lm
        self.blocks = _get(model, spec.layers)
        self._edge_blocking_ready = False
        layout = spec.block_layout
        flag = spec.parallel_flag
        if layout == "parallel" and flag and not getattr(model.config, flag, True):
            layout = "pre_norm"
        self._block_layout = layout
        self.parallel_residual = layout == "parallel"

    # ----- sizes -------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.embedding_module.weight.shape[1]

    @property
    def d_ff(self) -> int:
        # from the parameter's shape (an offloaded one keeps its shape on the meta device): nothing is loaded
        return self._keys_of(_get(self.blocks[0], self.spec.fc_in).weight).shape[0]

    @property
    def vocab_size(self) -> int:
        return self.embedding_module.weight.shape[0]

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        for name in ("n_positions", "max_position_embeddings"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                if self.spec.positions_after_pad and isinstance(cfg.pad_token_id, int):
                    return value - cfg.pad_token_id - 1  # RoBERTa: ids 0..pad are never positions
                return value
        return None

    @property
    def embedding_module(self) -> nn.Embedding:
        return _get(self.model, self.spec.embed)

    # ----- text --------------------------------------------------------------------------------------------
    def _make_vocab(self) -> HFVocabulary:
        return HFVocabulary(self.tokenizer, self.model.config, self.vocab_size)

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
        """The body's keyword for a key/value cache: ``cache`` (transformers >= 5.2x) or
        ``past_key_values``."""
        import inspect

        params = inspect.signature(self.model.base_model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def run_cached(self, cache: object, input_ids: torch.Tensor) -> torch.Tensor:
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
        if self.spec.head_chain:  # an MLM head the model class computes inline (DistilBERT)
            logits = h
            for path in self.spec.head_chain:
                logits = _get(self.model, path)(logits)
        else:
            head = _get(self.model, self.spec.head) if self.spec.head else self.model.get_output_embeddings()
            if head is None:
                raise ModelError(f"this {self.family} model has no output head; "
                                 "load a checkpoint with its LM/MLM head")
            logits = head(h)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        config, spec = self.model.config, self.spec
        if spec.logit_scale:  # Cohere: the causal-LM class scales the head's logits
            logits = logits * getattr(config, spec.logit_scale)
        cap = getattr(config, spec.logit_softcap, None) if spec.logit_softcap else None
        if cap:  # Gemma 2: the causal-LM class soft-caps the head's logits
            logits = cap * torch.tanh(logits / cap)
        return torch.log_softmax(logits, dim=-1)

    # ----- weights -----------------------------------------------------------------------------------------
    def _weight(self, layer: int, path: str) -> torch.Tensor:
        """The weight of a block's module: the parameter itself, or a copy where the block is offloaded."""
        block = self.blocks[self.check_layer(layer)]
        return read_tensor(block, _get(block, path))

    def _keys_of(self, w: torch.Tensor) -> torch.Tensor:
        """The key rows ``[d_ff, d]`` of the key projection's weight ``w`` (a view)."""
        if self.spec.gate_up:  # the gate rows of a fused gate | up projection
            w = w[: w.shape[0] // 2]
        return w.T if self.spec.conv1d else w

    def ffn_keys(self, layer: int) -> torch.Tensor:
        return self._keys_of(self._weight(layer, self.spec.fc_in))

    def write_ffn_values(self, layer: int, index, rows: torch.Tensor) -> None:
        if is_offloaded(_get(self.blocks[self.check_layer(layer)], self.spec.fc_out).weight):
            raise ModelError(f"block {layer} is offloaded by the device map, so its weights cannot be edited "
                             "in place; give it more --max_memory, or edit activations (fflayers.hooks)")
        super().write_ffn_values(layer, index, rows)

    def ffn_values(self, layer: int) -> torch.Tensor:
        w = self._weight(layer, self.spec.fc_out)
        return w if self.spec.conv1d else w.T

    def input_embeddings(self) -> torch.Tensor:
        weight = read_tensor(self.embedding_module, self.embedding_module)
        if self.spec.embed_scale:  # the rows as they enter the first block (Gemma: times sqrt(d))
            return weight * torch.tensor(self.model.config.hidden_size ** 0.5, dtype=weight.dtype)
        return weight

    def _linear(self, block: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight in ``nn.Linear`` layout ``[out, in]`` (GPT-2's Conv1D transposed) and bias of a
        projection."""
        module = _get(block, path)
        w = read_tensor(block, module).detach()
        b = read_tensor(block, module, "bias")
        b = None if b is None else b.detach()
        return (w.t() if self.spec.conv1d else w), b

    def attention_weights(self, layer: int) -> AttentionWeights:
        """Per-head attention weights (see :class:`AttentionWeights`; rotary and scaling not included)."""
        spec = self.spec
        block = self.blocks[self.check_layer(layer)]
        if not spec.attn_proj or not spec.attn_proj_out:
            raise ModelError(f"the ArchSpec of this {self.family} model names no attention projections "
                               "(set attn_proj and attn_proj_out)")
        n_heads = int(self.model.config.num_attention_heads)
        if len(spec.attn_proj) == 3:
            (q, qb), (k, kb), (v, vb) = (self._linear(block, path) for path in spec.attn_proj)
        elif len(spec.attn_proj) == 1 and spec.qkv_layout in QKV_LAYOUTS:
            split = QKV_LAYOUTS[spec.qkv_layout]
            (q, k, v), (qb, kb, vb) = split(*self._linear(block, spec.attn_proj[0]), n_heads)
        else:
            raise ModelError(f"ArchSpec.attn_proj must name 3 modules, or 1 fused module with qkv_layout "
                               f"in {sorted(QKV_LAYOUTS)}; got {spec.attn_proj} with {spec.qkv_layout!r}")
        o, ob = self._linear(block, spec.attn_proj_out)
        n_kv = k.shape[0] // (q.shape[0] // n_heads)  # grouped and multi-query heads: from the weights
        return AttentionWeights.from_linear(q, k, v, o, qb, kb, vb, ob, n_heads=n_heads, n_kv_heads=n_kv)

    def _unembed_module(self) -> nn.Module:
        spec = self.spec
        head = _get(self.model, spec.unembed) if spec.unembed else self.model.get_output_embeddings()
        if head is None:
            raise ModelError(f"this {self.family} model has no output head (an encoder without LM/MLM "
                               "head); output embeddings need a checkpoint with its head")
        return head

    def output_embeddings(self) -> torch.Tensor:
        """``[V, d]``: the LM head's weight (tied or not); BERT: the MLM decoder, which reads the hidden state
        after the head's transform (dense + activation + LayerNorm). Logits = ``h @ E.T`` + the head's
        bias."""
        head = self._unembed_module()
        return read_tensor(head, head).detach()

    @property
    def output_embeddings_kind(self) -> str:
        try:
            weight = self._unembed_module().weight
        except ModelError:
            return "none: model without output head"
        if self.spec.masked_lm:
            return "MLM decoder"
        embed = self.embedding_module.weight
        tied = weight is embed or weight.data_ptr() == embed.data_ptr()
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
            "mlp_in": (_get(block, spec.mlp_in), "input"),
            "mlp_key": (_get(block, spec.fc_in), "output"),
            "mlp_coef": (_get(block, spec.fc_out), "input"),
            "mlp_out": (_get(block, spec.mlp_out), "output"),
        }
        if point not in table:
            raise ModelError(f"unknown hook point {point!r}")
        module, side = table[point]
        features = (0, self.d_ff) if point == "mlp_key" and spec.gate_up else None
        return HookSite(module, side, time_first=False, arg_name="hidden_states", features=features)

    @property
    def block_layout(self) -> str:
        return self._block_layout

    def attention_module(self, layer: int) -> nn.Module:
        return _get(self.blocks[layer], self.spec.attn_core)

    def prepare_edge_blocking(self) -> None:
        """Route attention through fflayers' blocking function (see
        :func:`fflayers.backends.hf_attention.prepare_edge_blocking`)."""
        if not self._edge_blocking_ready:
            self.edge_blocking_route = prepare_edge_blocking(self, self.spec.attn_method)
            self._edge_blocking_ready = True


# ----- loading ---------------------------------------------------------------------------------------------


def load_hf_lm(name_or_path: str, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None, gguf_file: str | None = None,
               tokenizer_path: str | None = None, device_map: str | dict | None = None,
               max_memory: str | dict | None = None, offload_folder: str | None = None) -> HFAdapter:
    """Load a HuggingFace causal LM (or BERT masked LM) and its tokenizer into an :class:`HFAdapter`.

    ``name_or_path`` is a hub id (needs the internet unless cached) or a local folder; ``gguf_file`` loads a
    GGUF checkpoint from that folder (dequantised). BERT checkpoints without an MLM head load as an encoder
    whose ``project`` is unavailable. ``dtype``: the weights' dtype (``"bfloat16"``, ``torch.float16``...).

    A model larger than one device: ``device_map`` (``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
    ``"sequential"``, or module name -> device, ``"disk"`` included), ``max_memory`` (device -> size, e.g.
    ``{0: "20GiB", "cpu": "60GiB"}`` or ``"0=20GiB,cpu=60GiB"``) and ``offload_folder`` (for blocks put on
    disk) go to transformers' ``from_pretrained``, which places the blocks with accelerate; ``device`` is
    then ignored (inputs go to the embedding's device).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if Path(name_or_path).suffix == ".gguf":
        gguf_file, name_or_path = Path(name_or_path).name, str(Path(name_or_path).parent)
    device = resolve_device(device)  # a bad --device fails before anything loads
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    local = Path(name_or_path)
    if (name_or_path.startswith((".", "/")) or local.exists()) and not local.is_dir():
        raise ModelError(f"model folder {name_or_path} does not exist; give a local folder or a hub id")
    if local.is_dir() and not gguf_file and not (local / "config.json").is_file():
        raise ModelError(f"model folder {name_or_path} has no config.json; give the folder a HuggingFace "
                         "model was saved into (save_pretrained), or --gguf_file for a GGUF checkpoint there")
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load a model config from {name_or_path!r} ({first_line(err)}); "
                         "check the path or hub id (offline: use a local folder)") from None
    spec = arch_spec(config.model_type)
    check_config(config, name_or_path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    load = {"dtype": dtype or torch.float32, "output_loading_info": True, **kwargs}
    if device_map is not None:
        load |= {"device_map": parse_device_map(device_map), "max_memory": parse_max_memory(max_memory),
                 "offload_folder": offload_folder}
    elif max_memory is not None or offload_folder is not None:
        raise InputError("max_memory and offload_folder go with a device_map (e.g. device_map='auto')")
    try:
        if spec.masked_lm:
            model, info = AutoModelForMaskedLM.from_pretrained(name_or_path, **load)
            heads = spec.head_chain or (spec.head,)
            if any(k.startswith(f"{head}.") for k in info.get("missing_keys", []) for head in heads):
                model, info = AutoModel.from_pretrained(name_or_path, **load)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(name_or_path, **load)
    except (OSError, RuntimeError, ValueError) as err:
        if device_map is not None:
            raise ModelError(f"cannot place {name_or_path!r} with the device map ({first_line(err)}); give "
                             "every block a device this machine has, or use device_map='auto'") from None
        raise ModelError(f"cannot load the weights of {name_or_path!r} ({first_line(err)}); the weights do "
                         "not match the config: use the config.json saved with them") from None
    check_loading_info(info, name_or_path)
    tok_kwargs = {} if tokenizer_path else kwargs
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or name_or_path, **tok_kwargs)
    return HFAdapter(model, tokenizer, device=device)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run over many lines)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_config(config, where: str) -> None:
    """Refuse a config whose sizes cannot describe a model: hidden size not a multiple of the head count."""
    d, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if isinstance(d, int) and isinstance(heads, int) and heads > 0 and d % heads:
        raise ModelError(f"the config of {where!r} has hidden_size {d}, not a multiple of its {heads} "
                         "attention heads; fix config.json (it does not describe these weights)")


def check_loading_info(info: dict, where: str, shown: int = 4) -> None:
    """Refuse weights that were missing (left at random init) or of the wrong shape, naming them (weights the
    checkpoint has beyond the model, such as BERT's next-sentence head, are harmless and pass)."""
    for key, what in (("missing_keys", "missing from the checkpoint (they would stay random)"),
                      ("mismatched_keys", "of another shape than the config says")):
        names = sorted(str(n if isinstance(n, str) else n[0]) for n in info.get(key) or ())
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            raise ModelError(f"{where!r}: {len(names)} weights {what}: {', '.join(names[:shown])}{more}; "
                             "the config and the weights do not match (use the config.json saved with them)")
