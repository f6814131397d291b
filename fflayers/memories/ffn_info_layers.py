"""Layer mode of :mod:`fflayers.memories.ffn_info`: one row per (sentence, layer), and the per-layer summary.

:func:`reduce_layer` turns the activations gathered for a block of sentences into rows of ``LAYER_COLUMNS``;
:func:`ffn_info_by_layer` summarises a finished layer-mode table per layer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.memories.ffn_info_columns import LAYER_COLUMNS, RowMeta, key_columns
from fflayers.memories.ffn_info_heads import ScaledHead
from fflayers.memories.ffn_info_projections import head_stats, subupdates
from fflayers.memories.value_projections import full_precision

__all__ = ["reduce_layer", "ffn_info_by_layer"]


def reduce_layer(adapter: LMAdapter, g: dict[str, torch.Tensor], layers: list[int],
                 values: dict[int, torch.Tensor], norms: dict[int, torch.Tensor], dim_idx: torch.Tensor,
                 meta: RowMeta, shortcut: ScaledHead | None, max_elements: int) -> pd.DataFrame:
    """Layer-mode rows of one block of sentences (without ``df.attrs``; column order as built here).

    ``g``: the gathered activations (``final [S, d]``; ``r``, ``y``, ``m`` of shape ``[L', S, .]``);
    ``values`` / ``norms``: each layer's value vectors and their norms; ``dim_idx`` is unused (counts use all
    values; the argument keeps the signature of :func:`~fflayers.memories.ffn_info_dims.reduce_dim`);
    ``meta``: the rows' sentence ids, positions and next tokens; ``shortcut``: an exact head or None (the
    general path); ``max_elements``: log-probs alive per projection chunk.
    """
    S = g["final"].shape[0]
    chunk = max(1, max_elements // adapter.vocab_size)
    final_top1, final_p, _, _ = head_stats(adapter, g["final"], [], chunk)
    cols: dict[str, list] = {c: [] for c in LAYER_COLUMNS[6:]}
    for li, layer in enumerate(layers):
        r, y, m = g["r"][li], g["y"][li], g["m"][li]
        r_top, r_p, (r_rank,), (r_fp,) = head_stats(adapter, r, [final_top1], chunk)
        y_top, y_p, (y_rank, y_rrank), (y_fp, _) = head_stats(adapter, y, [final_top1, r_top], chunk)
        ry_top, ry_p, _, _ = head_stats(adapter, r + y, [], chunk)
        sub_top, _ = subupdates(adapter, values[layer], m, None, shortcut, max_elements)
        mc = full_precision(m).cpu()
        r_norm = full_precision(r).norm(dim=1).cpu()
        scaled = mc.abs() * norms[layer].cpu()[None]
        for name, val in (
            ("layer_top1", ry_top), ("layer_top1_prob", ry_p), ("residual_top1", r_top),
            ("residual_top1_prob", r_p), ("ffn_top1", y_top), ("ffn_top1_prob", y_p),
            ("residual_final_rank", r_rank),
            ("residual_final_prob", r_fp), ("ffn_final_rank", y_rank), ("ffn_final_prob", y_fp),
            ("ffn_rank_of_residual_top1", y_rrank), ("top1_changed", r_top != ry_top),
            ("memories_agreeing", ((sub_top == ry_top[:, None]) & (mc != 0)).sum(1)),
            ("active_memories", (mc > 0).sum(1)), ("residual_norm", r_norm.double()),
            ("residual_norm_rank", (scaled > r_norm[:, None]).sum(1)),
        ):
            cols[name].append(val.numpy())
    out = key_columns(meta, layers, final_top1, S)
    out["final_top1_prob"] = np.repeat(final_p.numpy(), len(layers))
    for name, parts in cols.items():
        out[name] = np.stack(parts, axis=1).reshape(-1)  # [S, L'] -> sentence-major rows
    return pd.DataFrame(out)


def ffn_info_by_layer(table: pd.DataFrame, d_ff: int | None = None) -> pd.DataFrame:
    """Per-layer summary of a layer-mode table.

    ``rows``; ``active_mean`` (mean number of active memories) and ``active_share`` (divided by ``d_ff``,
    taken from ``table.attrs`` when not given; NaN when unknown); ``matches_memory`` (share of rows whose
    layer top-1 equals the top-1 of at least one sub-update), ``matches_residual`` (layer top-1 = residual
    top-1), ``matches_neither``; ``residual_is_final`` (the residual's top-1 is already the model's final
    top-1); ``residual_dominates`` (``||r||`` exceeds every ``|m_i| ||v_i||``).
    """
    missing = [c for c in ("layer", "active_memories", "memories_agreeing", "top1_changed",
                           "residual_final_rank", "residual_norm_rank") if c not in table.columns]
    if missing:
        raise InputError(f"not a layer-mode ffn info table (missing {', '.join(missing)}); "
                           "pass the output of --extract_mode layer")
    d_ff = d_ff or table.attrs.get("d_ff")
    rows = []
    for layer, g in table.groupby("layer", sort=True):
        memory = g["memories_agreeing"] > 0
        residual = ~g["top1_changed"].astype(bool)
        rows.append({
            "layer": int(layer),
            "rows": len(g),
            "active_mean": float(g["active_memories"].mean()),
            "active_share": float(g["active_memories"].mean() / d_ff) if d_ff else float("nan"),
            "matches_memory": float(memory.mean()),
            "matches_residual": float(residual.mean()),
            "matches_neither": float((~memory & ~residual).mean()),
            "residual_is_final": float((g["residual_final_rank"] == 0).mean()),
            "residual_dominates": float((g["residual_norm_rank"] == 0).mean()),
        })
    return pd.DataFrame(rows)
