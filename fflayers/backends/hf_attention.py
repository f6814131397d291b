"""Attention-edge blocking routes of the HuggingFace backend (:func:`prepare_edge_blocking`).

``"interface"``: fflayers registers its own attention function in transformers' attention-function
interface and selects it on the model; ``"method"``: older attention classes compute attention in a
``_attn`` method (:data:`fflayers.backends.hf_arch.ATTN_METHODS`), wrapped per module instance.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn

from fflayers.backends.base import LMAdapter
from fflayers.core import ModelError
from fflayers.hooks import attention_with_blocked_edges, blocked_edges

__all__ = ["prepare_edge_blocking", "transformers_errors_only"]

_ATTN_NAME = "fflayers_blocking"  # no "sdpa" in it: transformers checks SDPA support for such names

#: attribute set on each attention module while :func:`_interface_reaches` probes a model: the probe's set
#: of ids of the attention modules that called :func:`_blocking_attention` (absent in ordinary runs)
_PROBE_ATTR = "_fflayers_attention_probe"


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

    seen = getattr(module, _PROBE_ATTR, None)
    if seen is not None:
        seen.add(id(module))
    blocked = blocked_edges(module)
    softcap = kwargs.get("softcap")
    if blocked is None and not softcap:  # (SDPA has no soft-capping: Gemma 2 always takes the explicit path)
        sdpa = AttentionInterface()["sdpa"]
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = _allowed_from_additive(attention_mask, scores, getattr(module, "is_causal", True))
    if blocked is None:
        blocked = torch.zeros(scores.shape[-2:], dtype=torch.bool, device=scores.device)
    elif blocked.shape[-1] > scores.shape[-1]:  # a sliding-window cache keeps only the last S keys
        blocked = blocked[..., -scores.shape[-1] :]
    out = attention_with_blocked_edges(scores, allowed, blocked, value.float()).to(value.dtype)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def transformers_errors_only() -> Iterator[None]:
    """transformers' logging at error level inside the block (load reports, expected warnings), then
    restored."""
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


def _interface_reaches(adapter: LMAdapter) -> bool:
    """Register the blocking attention function, select it on the model (public ``set_attn_implementation``)
    and check with a two-token forward that every layer's attention calls it. Restores the model's own
    implementation and returns False when it does not."""
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
        # "does not support setting its attention implementation" is expected
        with transformers_errors_only():
            setter(_ATTN_NAME)
    except (ValueError, KeyError, TypeError):
        return False
    modules = [adapter.attention_module(layer) for layer in range(adapter.n_layers)]
    targets = {id(module) for module in modules}
    seen: set[int] = set()
    ids = torch.zeros((1, 2), dtype=torch.long, device=adapter.device)
    try:
        for module in modules:
            setattr(module, _PROBE_ATTR, seen)
        with torch.no_grad():
            adapter._run_model(ids, torch.ones_like(ids, dtype=torch.bool))
        reached = targets <= seen
    finally:
        for module in modules:
            if hasattr(module, _PROBE_ATTR):
                delattr(module, _PROBE_ATTR)
    if not reached and previous is not None:
        with transformers_errors_only():
            setter(previous)
    return reached


def prepare_edge_blocking(adapter: LMAdapter, attn_method: str | None = None) -> str:
    """Make every attention layer of ``adapter`` honour :func:`fflayers.hooks.block_attention`; returns the
    route.

    ``"interface"``: the model's attention calls transformers' attention-function interface (the public
    ``AttentionInterface``), checked by running it; fflayers registers its own function there (SDPA when
    nothing is blocked). ``"method"``: older attention classes without the interface (GPT-Neo) compute
    attention in a ``_attn`` method, which is wrapped per module instance where ``attn_method`` (the spec's
    :data:`~fflayers.backends.hf_arch.ATTN_METHODS` variant) says how. Neither: :class:`ModelError`
    naming the architecture and the transformers version.
    """
    if _interface_reaches(adapter):
        return "interface"
    modules = [adapter.attention_module(layer) for layer in range(adapter.n_layers)]
    if attn_method is not None and all(callable(getattr(type(m), "_attn", None)) for m in modules):
        for module in modules:
            original = type(module)._attn
            module._attn = types.MethodType(_blocking_attn_method(original, attn_method), module)
        return "method"
    raise ModelError(
        f"attention-edge blocking is not available for {adapter.family} models with transformers "
        f"{_transformers_version()}: their attention neither calls the attention-function interface nor has "
        "the _attn method fflayers wraps; install the tested version (make install, requirements.lock)"
    )


def _blocking_attn_method(original, attn_method: str):
    """Wrap GPT-Neo / GPT-J ``_attn(query, key, value, attention_mask)`` to honour blocked edges."""

    def _attn(self, query, key, value, attention_mask=None, *args, **kwargs):
        blocked = blocked_edges(self)
        if blocked is None:
            return original(self, query, key, value, attention_mask, *args, **kwargs)
        scores = query.float() @ key.float().transpose(-1, -2)
        T, S = scores.shape[-2:]
        if attn_method == "scaled":  # GPT-J
            scores = scores / self.scale_attn
            allowed = _allowed_from_additive(attention_mask, scores, causal=True)
        else:  # "buffer_mask" (GPT-Neo): causal / local-window mask in a buffer, padding in the additive mask
            allowed = self.bias[:, :, S - T : S, :S].bool()
            if attention_mask is not None:
                allowed = allowed & _allowed_from_additive(attention_mask, scores, causal=True)
        out = attention_with_blocked_edges(scores, allowed, blocked, value.float()).to(value.dtype)
        return out, None

    return _attn
