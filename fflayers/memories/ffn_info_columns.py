"""Column layouts of the two ffn-info tables (:mod:`fflayers.memories.ffn_info`) and their key columns.

``LAYER_COLUMNS`` (layer mode) and ``DIM_COLUMNS`` (dim mode) fix the column order of the final tables;
:func:`key_columns` builds the columns both modes share, which identify a row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["LAYER_COLUMNS", "DIM_COLUMNS", "RowMeta", "key_columns"]

#: per sentence of a block: sentence id, chosen position, and the token that follows it
RowMeta = tuple[np.ndarray, np.ndarray, np.ndarray]

LAYER_COLUMNS = [
    "sentence", "position", "next_token", "layer", "final_top1", "final_top1_prob",
    "layer_top1", "layer_top1_prob", "residual_top1", "residual_top1_prob", "ffn_top1", "ffn_top1_prob",
    "residual_final_rank", "residual_final_prob", "ffn_final_rank", "ffn_final_prob",
    "ffn_rank_of_residual_top1", "top1_changed", "memories_agreeing", "active_memories", "residual_norm",
    "residual_norm_rank",
]
DIM_COLUMNS = [
    "sentence", "position", "next_token", "layer", "final_top1", "residual_top1", "residual_final_rank",
    "coefficients", "value_top1", "value_final_rank",
]


def key_columns(meta: RowMeta, layer_list: Sequence[int], final_top1: torch.Tensor,
                S: int) -> dict[str, np.ndarray]:
    """``sentence``, ``position``, ``next_token``, ``layer`` and ``final_top1`` of ``S`` sentences times the
    layers in ``layer_list``, sentence-major (each sentence's rows in layer order)."""
    sent, pos, nxt = meta
    L = len(layer_list)
    return {
        "sentence": np.repeat(sent, L).astype(np.int64),
        "position": np.repeat(pos, L).astype(np.int64),
        "next_token": np.repeat(nxt, L).astype(np.int64),
        "layer": np.tile(np.asarray(layer_list, dtype=np.int64), S),
        "final_top1": np.repeat(final_top1.numpy(), L).astype(np.int64),
    }
