"""What each FFN value vector predicts: ``P(v_i)`` through the model's own output head.

``P(h) = adapter.project(h)``: the final norm where the model has one, then the real output layer in eval
mode (fairseq's adaptive softmax included). Values are projected in chunks of rows so that at most
``chunk_values x vocab`` log-probabilities are alive at once; nothing of size ``[all values, vocab]`` is
built.

:func:`random_baseline` projects random vectors with the same norms as the values (one per value, isotropic
directions), the chance level for value-based statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fflayers.allocator import steady_heap
from fflayers.backends.base import LMAdapter
from fflayers.core import InputError

__all__ = [
    "value_predictions",
    "random_baseline",
    "random_values",
    "full_precision",
    "default_chunk_rows",
    "iter_projected",
]

#: default bound on the number of log-probabilities alive per chunk (64 Mi floats = 256 MB in fp32)
MAX_CHUNK_ELEMENTS = 1 << 26


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is half precision, otherwise unchanged (float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def default_chunk_rows(adapter: LMAdapter, max_elements: int = MAX_CHUNK_ELEMENTS) -> int:
    """Rows per projection chunk so that ``rows * vocab_size <= max_elements`` (at least 1)."""
    return max(1, int(max_elements) // max(1, adapter.vocab_size))


def iter_projected(
    adapter: LMAdapter, vectors: torch.Tensor, chunk_rows: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, log_probs[len(rows), V])`` for consecutive chunks of ``vectors [N, d]``."""
    if chunk_rows < 1:
        raise InputError(f"chunk size {chunk_rows} must be >= 1")
    steady_heap()
    for start in range(0, vectors.shape[0], chunk_rows):
        rows = slice(start, min(start + chunk_rows, vectors.shape[0]))
        chunk = vectors[rows]
        yield rows, full_precision(adapter.project(chunk, chunk_size=chunk.shape[0]))


def random_values(adapter: LMAdapter, layer: int, seed: int = 0) -> torch.Tensor:
    """Random vectors ``[d_ff, d]`` with the norms of layer ``layer``'s values (isotropic directions).

    Deterministic for a given ``(seed, layer)``.
    """
    layer = adapter.check_layer(layer)
    values = adapter.ffn_values(layer).detach()
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + layer)
    rand = torch.randn(values.shape, generator=gen, dtype=torch.float32)
    rand = rand / rand.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (rand.to(values.device, values.dtype) * values.float().norm(dim=1, keepdim=True).to(values.dtype))


def _predictions(
    adapter: LMAdapter,
    layer_vectors: Callable[[int], torch.Tensor],
    layers: Sequence[int],
    top_k: int,
    chunk_values: int,
    progress: bool,
) -> pd.DataFrame:
    if top_k < 1:
        raise InputError(f"top_k={top_k} must be >= 1")
    top_k = min(top_k, adapter.vocab_size)
    frames = []
    bar = tqdm(total=len(layers), desc="value projections", disable=not progress)
    with torch.no_grad():
        for layer in layers:
            vectors = layer_vectors(layer)
            ids_parts, probs_parts = [], []
            for _rows, lp in iter_projected(adapter, vectors, chunk_values):
                top_lp, top_ids = lp.topk(top_k, dim=1)
                ids_parts.append(top_ids.cpu())
                probs_parts.append(top_lp.exp().cpu())
            top_ids = torch.cat(ids_parts).numpy()
            top_probs = torch.cat(probs_parts).numpy()
            tokens = adapter.vocab.id_to_token(top_ids[:, 0].tolist())
            frames.append(pd.DataFrame({
                "layer": np.full(len(top_ids), layer, dtype=np.int64),
                "dim": np.arange(len(top_ids), dtype=np.int64),
                "max_prob": top_probs[:, 0].astype(np.float64),
                "top1_id": top_ids[:, 0].astype(np.int64),
                "top1_token": tokens,
                "topk_ids": list(top_ids),
                "topk_probs": list(top_probs),
            }))
            bar.update(1)
    bar.close()
    return pd.concat(frames, ignore_index=True)


def value_predictions(
    adapter: LMAdapter,
    layers: Iterable[int] | None = None,
    top_k: int = 10,
    chunk_values: int = 256,
    progress: bool = False,
) -> pd.DataFrame:
    """``P(v_i)`` for every value of the chosen layers (default: all), ``chunk_values`` values at a time.

    Returns one row per value: ``layer``, ``dim``, ``max_prob`` (probability of the top-1 token), ``top1_id``,
    ``top1_token``, ``topk_ids`` and ``topk_probs`` (numpy arrays of length ``top_k``, best first).
    """
    return _predictions(adapter, lambda layer: adapter.ffn_values(layer).detach(),
                        adapter.check_layers(layers), top_k, chunk_values, progress)


def random_baseline(
    adapter: LMAdapter,
    layers: Iterable[int] | None = None,
    top_k: int = 10,
    chunk_values: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Like :func:`value_predictions` for random vectors with the values' norms (:func:`random_values`)."""
    return _predictions(adapter, lambda layer: random_values(adapter, layer, seed),
                        adapter.check_layers(layers), top_k, chunk_values, progress)
