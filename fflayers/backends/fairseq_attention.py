"""Attention-edge blocking for fairseq ``MultiheadAttention``: a forward hook that recomputes self-attention
with the edges :func:`fflayers.hooks.block_attention` set on the module removed."""

from __future__ import annotations

import torch

from fflayers.core import ModelError

__all__ = ["blocked_attention_hook"]


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def blocked_attention_hook(module, args, kwargs, output):
    """Recompute fairseq ``MultiheadAttention`` self-attention with the blocked edges removed."""
    from fflayers.hooks import attention_with_blocked_edges, blocked_edges

    blocked = blocked_edges(module)
    if blocked is None:
        return None
    if _arg(args, kwargs, 4, "incremental_state") is not None:
        raise ModelError("edge blocking does not support incremental decoding; run the full sequence")
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
