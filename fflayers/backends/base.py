"""The one interface every analysis talks to: :class:`LMAdapter`.

Conventions, for every backend:

* Tensors handed to users and to hook callbacks are batch-first: ``[batch, positions, features]``.
* A layer ``l`` is one transformer block. Its hook points are listed in :data:`fflayers.core.HOOK_POINTS`.
* FFN key ``i`` of layer ``l`` is the vector whose dot product with the (normalised) residual gives the
  pre-activation of neuron ``i``; value ``i`` is the vector that neuron writes to the residual stream
  (``mlp_out = sum_i m_i * V[l, i] + bias``).
* ``project(h)`` maps a residual-stream vector to log-probabilities over the vocabulary with the model's own
  output head (final norm where the model has one, adaptive softmax in eval mode).
* Attention weights (:class:`AttentionWeights`) and output embeddings act on row vectors: ``x @ W``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fflayers.backends.vocabulary import Vocabulary
from fflayers.core import HookSite, InputError, ModelError, StopForward


@dataclass(frozen=True)
class AttentionWeights:
    """The parameters of one self-attention layer, split per head (row-vector convention).

    With ``x`` the (normalised) stream the attention reads and ``g = kv_head(h)``::

        q_h = x @ W_Q[h] + b_Q[h]      k_g = x @ W_K[g] + b_K[g]      v_g = x @ W_V[g] + b_V[g]
        attn_out = sum_h (sum_s a_h[t, s] * v_g[s]) @ W_O[h] + b_O

    These are the raw projections as stored in the model: the score scaling (``1/sqrt(d_head)``, which
    fairseq folds into q inside its forward), rotary position embeddings (GPT-J, GPT-NeoX, Llama) and any
    other transformation applied between the projections and the softmax are NOT part of the weights.
    Tensors are detached views of the parameters where possible (in-place edits change the model), in the
    stored dtype. A bias the layer does not have is None.
    """

    W_Q: torch.Tensor  #: [n_heads, d_model, d_head]
    W_K: torch.Tensor  #: [n_kv_heads, d_model, d_head]
    W_V: torch.Tensor  #: [n_kv_heads, d_model, d_head]
    W_O: torch.Tensor  #: [n_heads, d_head, d_model]
    b_Q: torch.Tensor | None  #: [n_heads, d_head]
    b_K: torch.Tensor | None  #: [n_kv_heads, d_head]
    b_V: torch.Tensor | None  #: [n_kv_heads, d_head]
    b_O: torch.Tensor | None  #: [d_model]
    n_heads: int
    n_kv_heads: int

    def __post_init__(self) -> None:
        H, G = self.n_heads, self.n_kv_heads
        if H <= 0 or G <= 0 or H % G:
            raise ModelError(
                f"{H} query heads cannot share {G} key/value heads; n_heads must be a multiple of n_kv_heads")
        d, dh = self.W_Q.shape[1], self.W_Q.shape[2]
        expected = {
            "W_Q": (H, d, dh), "W_K": (G, d, dh), "W_V": (G, d, dh), "W_O": (H, dh, d),
            "b_Q": (H, dh), "b_K": (G, dh), "b_V": (G, dh), "b_O": (d,),
        }
        for name, shape in expected.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ModelError(f"attention weight {name} has shape {tuple(t.shape)}, expected {shape}")

    @property
    def d_model(self) -> int:
        return int(self.W_Q.shape[1])

    @property
    def d_head(self) -> int:
        return int(self.W_Q.shape[2])

    def kv_head(self, h: int) -> int:
        """The key/value head that query head ``h`` reads (grouped-query attention; ``h`` itself
        otherwise)."""
        if not 0 <= h < self.n_heads:
            raise ModelError(f"head {h} is out of range: the layer has {self.n_heads} heads "
                             f"(0..{self.n_heads - 1})")
        return h // (self.n_heads // self.n_kv_heads)

    @classmethod
    def from_linear(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        o: torch.Tensor,
        q_bias: torch.Tensor | None,
        k_bias: torch.Tensor | None,
        v_bias: torch.Tensor | None,
        o_bias: torch.Tensor | None,
        n_heads: int,
        n_kv_heads: int,
    ) -> AttentionWeights:
        """Split ``nn.Linear``-layout matrices into heads.

        ``q`` ``[n_heads * d_head, d_model]``, ``k``/``v`` ``[n_kv_heads * d_head, d_model]`` (output features
        head-major, as ``y = x @ W.T + b`` computes them) and ``o`` ``[d_model, n_heads * d_head]``.
        """
        q, k, v, o = (w.detach() for w in (q, k, v, o))
        d = q.shape[1]
        if q.shape[0] % n_heads:
            raise ModelError(f"query projection of {q.shape[0]} features does not split into {n_heads} heads")
        dh = q.shape[0] // n_heads

        def heads(w: torch.Tensor, n: int) -> torch.Tensor:  # [n * dh, d] -> [n, d, dh]
            return w.reshape(n, dh, d).transpose(1, 2)

        def bias(b: torch.Tensor | None, n: int) -> torch.Tensor | None:
            return None if b is None else b.detach().reshape(n, dh)

        return cls(
            W_Q=heads(q, n_heads), W_K=heads(k, n_kv_heads), W_V=heads(v, n_kv_heads),
            W_O=o.t().reshape(n_heads, dh, o.shape[0]),
            b_Q=bias(q_bias, n_heads), b_K=bias(k_bias, n_kv_heads), b_V=bias(v_bias, n_kv_heads),
            b_O=None if o_bias is None else o_bias.detach(),
            n_heads=n_heads, n_kv_heads=n_kv_heads,
        )


class LMAdapter(ABC):
    """A language model opened up: tokenizer, forward pass with hook points, FFN weights, output head."""

    #: model family, e.g. "fairseq", "gpt2", "llama"
    family: str = ""
    #: True for masked LMs (BERT): the prediction for a position is read at that position, not the next one.
    is_masked_lm: bool = False

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, move: bool = True) -> None:
        """``move=False`` leaves the model where it is (a model placed over several devices); ``device`` is
        then where inputs go."""
        self.model = model
        self.device = resolve_device(device)
        if move:
            self.model.to(self.device)
        self.model.eval()

    # ----- sizes -------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def n_layers(self) -> int: ...

    @property
    @abstractmethod
    def d_model(self) -> int: ...

    @property
    @abstractmethod
    def d_ff(self) -> int: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def max_positions(self) -> int | None:
        """Longest input (in tokens, BOS included) the model accepts, or None if unbounded."""
        return None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ----- text --------------------------------------------------------------------------------------------
    @property
    def vocab(self) -> Vocabulary:
        """The model's vocabulary: tokenization (with character offsets), id <-> token, the special ids."""
        vocab = self.__dict__.get("_vocab")
        if vocab is None:
            vocab = self._vocab = self._make_vocab()
        return vocab

    @vocab.setter
    def vocab(self, vocab: Vocabulary) -> None:
        """Give the adapter another vocabulary (e.g. a tokenizer for a model loaded without one)."""
        self._vocab = vocab

    @abstractmethod
    def _make_vocab(self) -> Vocabulary:
        """The backend's :class:`~fflayers.backends.vocabulary.Vocabulary` (built once, on first use)."""

    # ----- forward -----------------------------------------------------------------------------------------
    @abstractmethod
    def _run_model(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the body and return the last block's output ``[B, T, d]`` (before any final norm)."""

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run the model body on a right-padded batch; returns the final residual stream ``[B, T, d]``.

        ``attention_mask`` is True for real tokens. Returns None when a hook stopped the pass early
        (see :func:`fflayers.hooks.capture` with ``stop_early``).
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.to(self.device).bool()
        self.check_length(input_ids.shape[1])
        try:
            return self._run_model(input_ids, attention_mask)
        except StopForward:
            return None

    def prefix_cache(self, prefix_ids: torch.Tensor, batch: int) -> object | None:
        """Keys and values of one shared prefix ``prefix_ids`` ``[1, P]`` (no padding), repeated for ``batch``
        rows, for :meth:`run_cached`; computed without gradients (run it before installing hooks). None when
        the backend cannot cache a prefix (masked LMs, fairseq): the caller then runs whole sequences."""
        return None

    def run_cached(self, cache: object, input_ids: torch.Tensor) -> torch.Tensor:
        """Final residual stream ``[batch, T, d]`` of ``input_ids`` ``[batch, T]`` read after the cached
        prefix: hooks see only these ``T`` positions (their position 0 is position ``P`` of the whole
        sequence). A cache serves one call."""
        raise ModelError(f"{type(self).__name__} cannot cache a prefix; run whole sequences")

    def log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token log-probabilities ``[B, T, V]`` (masked LMs: log-probs of the token at each
        position)."""
        h = self.run(input_ids, attention_mask)
        if h is None:
            raise ModelError("the forward pass was stopped early by a hook; log_probs needs the full pass")
        return self.project(h)

    def check_length(self, n_tokens: int) -> None:
        """Raise :class:`ModelError` when a sequence is longer than the model allows."""
        limit = self.max_positions
        if limit is not None and n_tokens > limit:
            raise ModelError(
                f"sequence of {n_tokens} tokens is longer than the model's {limit} positions; "
                "split the text into shorter sentences or use truncate=True when batching"
            )

    # ----- output head -------------------------------------------------------------------------------------
    @abstractmethod
    def _project_rows(self, h: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """Log-probs ``[N, V]`` of residual vectors ``[N, d]`` through the final norm (unless ``final_norm``
        is False) and the head."""

    def project(self, h: torch.Tensor, chunk_size: int = 1024, final_norm: bool = True) -> torch.Tensor:
        """Log-probabilities over the vocabulary of residual-stream vectors ``[..., d]`` -> ``[..., V]``.

        Uses the model's own head (final norm where it has one, adaptive softmax in eval mode), chunked
        so that at most ``chunk_size`` rows of full-vocabulary scores are alive at a time.
        ``final_norm=False`` skips the norm applied to the last block's output before the head (fairseq's
        decoder ``layer_norm``, HF ``ln_f`` / ``norm``): log-softmax of ``h @ E.T`` (+ the head's bias), as
        when sublayer outputs are read in the vocabulary. Models without such a norm (BERT: its MLM head's own
        transform is kept) give the same result either way.
        """
        shape = h.shape[:-1]
        flat = h.reshape(-1, h.shape[-1]).to(self.device, self.dtype)
        outs = [self._project_rows(flat[i : i + chunk_size], final_norm=final_norm)
                for i in range(0, flat.shape[0], chunk_size)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs) if outs else flat.new_zeros(0, self.vocab_size)
        return out.reshape(*shape, out.shape[-1])

    # ----- weights -----------------------------------------------------------------------------------------
    @abstractmethod
    def ffn_keys(self, layer: int) -> torch.Tensor:
        """Keys of one layer, ``[d_ff, d]`` (Llama-style: rows of the gate projection)."""

    @abstractmethod
    def ffn_values(self, layer: int) -> torch.Tensor:
        """Values of one layer, ``[d_ff, d]`` (row i is what neuron i writes, scaled by its coefficient)."""

    @torch.no_grad()
    def write_ffn_values(self, layer: int, index: Sequence[int], rows: torch.Tensor) -> None:
        """Overwrite values ``index`` of ``layer`` in place with ``rows`` ``[len(index), d]``: the model's own
        weights change (save :meth:`ffn_values` rows first to undo). Works through :meth:`ffn_values`, which
        must return a view of a model parameter (:class:`ModelError` otherwise)."""
        view = self.ffn_values(layer)
        idx = torch.as_tensor(list(index), dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= view.shape[0]):
            raise ModelError(f"value index out of range: layer {layer} has {view.shape[0]} values "
                             f"(0..{view.shape[0] - 1})")
        rows = torch.as_tensor(rows).reshape(idx.numel(), view.shape[1])
        ptr = view.untyped_storage().data_ptr()
        if not any(p.untyped_storage().data_ptr() == ptr for p in self.model.parameters()):
            raise ModelError(f"{type(self).__name__}.ffn_values returns a copy, not a view of the model's "
                             "weights; override write_ffn_values for this backend")
        view[idx.to(view.device)] = rows.to(view.device, view.dtype)

    @abstractmethod
    def input_embeddings(self) -> torch.Tensor:
        """The token embedding matrix ``[V, d]`` (fairseq adaptive input: every band mapped to ``d``)."""

    @abstractmethod
    def output_embeddings(self) -> torch.Tensor:
        """Output embeddings ``[V, d]``, one row per token in vocabulary order: ``h @ E.T`` gives the output
        logits (up to the head's bias) of a final hidden state ``h`` taken after the model's final norm (BERT:
        after the MLM head's transform). :class:`ModelError` for models without an output head."""

    @property
    @abstractmethod
    def output_embeddings_kind(self) -> str:
        """Short description of what :meth:`output_embeddings` returns (for metadata)."""

    @abstractmethod
    def attention_weights(self, layer: int) -> AttentionWeights:
        """Query/key/value/output weights of the self-attention of block ``layer``, split per head."""

    # ----- hook plumbing (used by fflayers.hooks) ----------------------------------------------------------
    @abstractmethod
    def hook_site(self, point: str, layer: int) -> HookSite:
        """Module and side that carry hook point ``point`` of block ``layer`` (an adapter without an
        ``mlp_in`` entry gets the input of ``mlp_key``'s module from :func:`fflayers.hooks.site_of`)."""

    @property
    def block_layout(self) -> str:
        """How the block wires its sublayers: one of :data:`fflayers.core.BLOCK_LAYOUTS`."""
        return "pre_norm"

    @abstractmethod
    def attention_module(self, layer: int) -> nn.Module:
        """The self-attention module of block ``layer`` (edge blocking acts there)."""

    def prepare_edge_blocking(self) -> None:
        """Make the attention modules honour :func:`fflayers.hooks.block_attention` (called before
        blocking)."""
        return None

    def check_layer(self, layer: int) -> int:
        """Normalise a (possibly negative) layer index, or raise :class:`ModelError`."""
        if not -self.n_layers <= layer < self.n_layers:
            raise ModelError(f"layer {layer} is out of range: the model has {self.n_layers} layers "
                             f"(0..{self.n_layers - 1})")
        return layer % self.n_layers

    def check_layers(self, layers: Iterable[int] | None = None, *, sort: bool = False) -> list[int]:
        """The one layer-list checker: normalised (negative counts from the top), de-duplicated indices in the
        order given (ascending with ``sort``); every layer for None; :class:`ModelError` when an index is out
        of range or the list is empty."""
        if layers is None:
            return list(range(self.n_layers))
        out: list[int] = []
        for layer in layers:
            layer = self.check_layer(int(layer))
            if layer not in out:
                out.append(layer)
        if not out:
            raise ModelError("no layers selected; pass at least one layer index (or None for all)")
        return sorted(out) if sort else out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(family={self.family!r}, layers={self.n_layers}, d_model={self.d_model}, "
            f"d_ff={self.d_ff}, vocab={self.vocab_size}, device={self.device})"
        )


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else as given, once checked: a device
    string torch does not know, or a device this machine does not have, is a one-line :class:`InputError`."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but this torch sees no CUDA GPU "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
                             "use --device cpu or auto")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise InputError(f"device {device!r} does not exist: this machine has {n} CUDA device(s), "
                             f"cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r} asked for, but MPS is not available here; "
                         "use --device cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise InputError(f"device {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev
