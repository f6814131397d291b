"""FF keys and values, and attention heads, projected to the vocabulary (Dar et al., "Analyzing Transformers
in Embedding Space").

A vector ``x`` of the model's space is read as the tokens ``x @ E^T`` ranks highest, ``E [V, d]`` the
embedding matrix of :func:`~fflayers.embedding_space.vocabulary.embedding_matrix`. Values (written into the
stream) and keys (read from it) are both projected this way; the paper uses ``E^T`` in place of the
pseudo-inverse for the read side. A head's ``W_QK = W_Q^h W_K^h^T`` and ``W_VO = W_V^h W_O^h`` (``[d, d]``)
become the ``V x V`` matrices ``E W E^T``, whose top entries :func:`~fflayers.embedding_space.pairs.top_pairs`
finds exactly without building them. No norm is applied (the paper's definition).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.embedding_space.pairs import PairFilter, top_pairs
from fflayers.embedding_space.vocabulary import Embedding

__all__ = ["TOKEN_COLUMNS", "PAIR_COLUMNS", "neuron_vectors", "neuron_tokens", "iter_neuron_tokens",
           "neuron_token_chunk", "head_matrix", "head_factors", "head_pairs"]

TOKEN_COLUMNS = ["layer", "neuron", "side", "rank", "token_id", "token", "score"]
PAIR_COLUMNS = ["layer", "head", "kv_head", "kind", "rank", "row_token_id", "row_token", "col_token_id",
                "col_token", "score"]
SIDES = ("key", "value")
KINDS = ("qk", "ov")


def neuron_vectors(adapter: LMAdapter, layer: int, side: str) -> torch.Tensor:
    """``[d_ff, d]``: the layer's FF keys (``side="key"``) or values (``"value"``)."""
    if side not in SIDES:
        raise InputError(f"unknown side {side!r}; use 'key' or 'value'")
    layer = adapter.check_layer(layer)
    return (adapter.ffn_keys(layer) if side == "key" else adapter.ffn_values(layer)).detach()


def _check_neurons(adapter: LMAdapter, neurons: Iterable[int] | None) -> list[int]:
    if neurons is None:
        return list(range(adapter.d_ff))
    out = [int(i) for i in neurons]
    bad = [i for i in out if not 0 <= i < adapter.d_ff]
    if bad:
        raise InputError(f"neuron {bad[0]} is out of range: layers have {adapter.d_ff} neurons "
                         f"(0..{adapter.d_ff - 1})")
    if not out:
        raise InputError("no neurons selected; pass at least one neuron index (or none for all)")
    return out


def _check_k(k: int, vocab: int) -> int:
    if not 1 <= k <= vocab:
        raise InputError(f"k = {k} must be between 1 and the vocabulary size {vocab}")
    return k


def iter_neuron_tokens(
    adapter: LMAdapter, E: Embedding, layers: Sequence[int], sides: Sequence[str] = SIDES, k: int = 20,
    neurons: Iterable[int] | None = None, chunk: int = 1024, largest: bool = True,
) -> Iterator[pd.DataFrame]:
    """Top-``k`` tokens of each selected neuron, one table per (layer, side, chunk of neurons)
    (:data:`TOKEN_COLUMNS`), best first; ``largest=False`` lists the most negative scores."""
    k = _check_k(k, E.matrix.shape[0])
    idx = _check_neurons(adapter, neurons)
    tokens = np.asarray(adapter.vocab.tokens, dtype=object)
    Et = E.matrix.float().T
    for layer in layers:
        for side in sides:
            vecs = neuron_vectors(adapter, layer, side)
            for start in range(0, len(idx), chunk):
                neurons = idx[start : start + chunk]
                yield neuron_token_chunk(vecs, Et, tokens, layer, side, neurons, k, largest)


def neuron_token_chunk(vecs: torch.Tensor, Et: torch.Tensor, tokens: np.ndarray, layer: int, side: str,
                       neurons: Sequence[int], k: int, largest: bool = True) -> pd.DataFrame:
    """The table of :func:`iter_neuron_tokens` for ``neurons`` of ``vecs`` (:func:`neuron_vectors` of
    ``layer`` and ``side``); ``Et``: the embedding matrix as float32, transposed ``[d, V]``; ``tokens``: the
    vocabulary as an object array."""
    sel = torch.as_tensor(neurons, dtype=torch.long)
    with torch.no_grad():
        scores = vecs[sel.to(vecs.device)].float() @ Et.to(vecs.device)
        top = scores.topk(k, dim=1, largest=largest)
    ids = top.indices.cpu().numpy()
    n = len(sel)
    return pd.DataFrame({
        "layer": np.full(n * k, layer, dtype=np.int64),
        "neuron": np.repeat(sel.numpy(), k),
        "side": side,
        "rank": np.tile(np.arange(k, dtype=np.int64), n),
        "token_id": ids.reshape(-1).astype(np.int64),
        "token": tokens[ids.reshape(-1)],
        "score": top.values.cpu().double().numpy().reshape(-1),
    })


def neuron_tokens(adapter: LMAdapter, E: Embedding, layers: Sequence[int], sides: Sequence[str] = SIDES,
                  k: int = 20, neurons: Iterable[int] | None = None, largest: bool = True) -> pd.DataFrame:
    """All of :func:`iter_neuron_tokens` in one table."""
    frames = list(iter_neuron_tokens(adapter, E, layers, sides, k, neurons, largest=largest))
    return pd.concat(frames, ignore_index=True)[TOKEN_COLUMNS]


def head_factors(adapter: LMAdapter, layer: int, head: int,
                 kind: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(U, Vt, kv_head)`` with ``head_matrix = U @ Vt``: ``W_Q^h``, ``W_K^g^T`` (qk) or ``W_V^g``, ``W_O^h``
    (ov), ``[d, d_head]`` and ``[d_head, d]``, where ``g`` is the key/value head query head ``h`` uses
    (grouped-query attention)."""
    if kind not in KINDS:
        raise InputError(f"unknown head matrix {kind!r}; use 'qk' or 'ov'")
    layer = adapter.check_layer(layer)
    aw = adapter.attention_weights(layer)
    if not 0 <= head < aw.n_heads:
        raise InputError(f"head {head} is out of range: layer {layer} has {aw.n_heads} heads "
                         f"(0..{aw.n_heads - 1})")
    g = aw.kv_head(head)
    if kind == "qk":
        U, Vt = aw.W_Q[head].detach().float(), aw.W_K[g].detach().float().T
    else:
        U, Vt = aw.W_V[g].detach().float(), aw.W_O[head].detach().float()
    d = adapter.d_model
    if U.shape[0] != d or Vt.shape[1] != d or U.shape[1] != Vt.shape[0]:
        raise InputError(f"layer {layer} head {head}: {kind} factors have shapes {tuple(U.shape)} and "
                           f"{tuple(Vt.shape)}, not ({d}, d_head) and (d_head, {d}); the model's attention "
                           "weights do not have the expected shapes")
    return U, Vt, g


def head_matrix(adapter: LMAdapter, layer: int, head: int, kind: str) -> tuple[torch.Tensor, int]:
    """``(W, kv_head)``: ``W_QK = W_Q^h W_K^g^T`` (``kind="qk"``: rows query tokens, columns key tokens) or
    ``W_VO = W_V^g W_O^h`` (``"ov"``: rows the tokens read, columns the tokens written), ``[d, d]``: the
    product of :func:`head_factors`."""
    U, Vt, g = head_factors(adapter, layer, head, kind)
    with torch.no_grad():
        return U @ Vt, g


def head_pairs(
    adapter: LMAdapter, E: Embedding, layer: int, head: int, kind: str, n: int = 50, largest: bool = True,
    filt: PairFilter | None = None, block_rows: int | None = None,
) -> pd.DataFrame:
    """The exact top-``n`` (``largest=False``: bottom-``n``) token pairs of ``E W E^T`` for one head
    (:data:`PAIR_COLUMNS`), computed through the head's rank-``d_head`` factors."""
    U, Vt, g = head_factors(adapter, layer, head, kind)
    Em = E.matrix.detach().float().to(U.device)
    with torch.no_grad():
        rows_side, cols_side = Em @ U, Em @ Vt.T  # [V, d_head] each
    eye = torch.eye(U.shape[1], dtype=rows_side.dtype, device=U.device)
    scores, rows, cols = top_pairs(rows_side, eye, cols_side, n, largest=largest, filt=filt,
                                   block_rows=block_rows)
    tokens = adapter.vocab.tokens
    r, c = rows.cpu().tolist(), cols.cpu().tolist()
    m = len(r)
    return pd.DataFrame({
        "layer": [layer] * m, "head": [head] * m, "kv_head": [g] * m, "kind": [kind] * m,
        "rank": list(range(m)), "row_token_id": r, "row_token": [tokens[i] for i in r],
        "col_token_id": c, "col_token": [tokens[i] for i in c], "score": scores.cpu().double().tolist(),
    }, columns=PAIR_COLUMNS)
