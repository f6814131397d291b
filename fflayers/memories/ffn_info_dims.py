"""Dim mode of :mod:`fflayers.memories.ffn_info`: one row per (sentence, layer) with per-value array columns.

:func:`reduce_dim` turns the activations gathered for a block of sentences into rows of ``DIM_COLUMNS``: the
scaled coefficients ``m_i ||v_i||``, ``argmax P(m_i v_i)`` and the final top-1's rank under it, for the
selected dims.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.memories.ffn_info_columns import RowMeta, key_columns
from fflayers.memories.ffn_info_heads import ScaledHead
from fflayers.memories.ffn_info_projections import head_stats, subupdates
from fflayers.memories.value_projections import full_precision

__all__ = ["reduce_dim"]


def reduce_dim(adapter: LMAdapter, g: dict[str, torch.Tensor], layers: list[int],
               values: dict[int, torch.Tensor], norms: dict[int, torch.Tensor], dim_idx: torch.Tensor,
               meta: RowMeta, shortcut: ScaledHead | None, max_elements: int) -> pd.DataFrame:
    """Dim-mode rows of one block of sentences (without ``df.attrs``; column order as built here).

    ``g``: the gathered activations (``final [S, d]``; ``r``, ``m`` of shape ``[L', S, .]``); ``values`` /
    ``norms``: each layer's value vectors and their norms; ``dim_idx``: the selected dims; ``meta``: the rows'
    sentence ids, positions and next tokens; ``shortcut``: an exact head or None (the general path);
    ``max_elements``: log-probs alive per projection chunk.
    """
    S = g["final"].shape[0]
    chunk = max(1, max_elements // adapter.vocab_size)
    final_top1, _, _, _ = head_stats(adapter, g["final"], [], chunk)
    r_tops, r_ranks, coefs, v_tops, v_ranks = [], [], [], [], []
    for li, layer in enumerate(layers):
        r, m = g["r"][li], g["m"][li][:, dim_idx]
        r_top, _, (r_rank,), _ = head_stats(adapter, r, [final_top1], chunk)
        v_top, v_rank = subupdates(adapter, values[layer][dim_idx], m, final_top1, shortcut, max_elements)
        r_tops.append(r_top.numpy())
        r_ranks.append(r_rank.numpy())
        coefs.append((full_precision(m) * norms[layer][dim_idx][None]).cpu().numpy().astype(np.float32))
        v_tops.append(v_top.numpy())
        v_ranks.append(v_rank.numpy())
    out = key_columns(meta, layers, final_top1, S)
    out["residual_top1"] = np.stack(r_tops, axis=1).reshape(-1)
    out["residual_final_rank"] = np.stack(r_ranks, axis=1).reshape(-1)
    for name, parts in (("coefficients", coefs), ("value_top1", v_tops), ("value_final_rank", v_ranks)):
        arr = np.stack(parts, axis=1).reshape(S * len(layers), -1)  # [S * L', n_dims]
        out[name] = list(arr)
    return pd.DataFrame(out)
