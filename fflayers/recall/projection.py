"""Vocabulary projections of hidden states and sublayer outputs at chosen positions of factual prompts.

A vector ``h`` at a hook point is read in the vocabulary through the model's own head:
``log_softmax(norm(h) @ E.T)`` with the final norm, or ``log_softmax(h @ E.T)`` without it (the way sublayer
outputs are read in Geva et al., 2023). Positions are named per fact (see :data:`POSITION_NAMES`) or given
as token indices (negative ones count from the prompt's end).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.recall.batching import FactBatch, fact_batches
from fflayers.recall.facts import EncodedFact

__all__ = ["POSITION_NAMES", "PROJECTABLE_POINTS", "position_index", "batch_positions", "project_topk",
           "gather_rows", "vocabulary_projections"]

#: named positions: the prompt's first token, the subject's first and last tokens, the first token after the
#: subject (the relation's start; the last token when the subject ends the prompt) and the prompt's last token
POSITION_NAMES = ("first", "subject_first", "subject_last", "after_subject", "last")
#: hook points that carry ``d_model`` vectors and can be read in the vocabulary
PROJECTABLE_POINTS = ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")


def position_index(item: EncodedFact, position: str | int) -> int:
    """Token index of a named position (:data:`POSITION_NAMES`) or of an integer index in one fact's
    prompt."""
    n = len(item.ids)
    if isinstance(position, str) and position.lstrip("-").isdigit():
        position = int(position)
    if isinstance(position, int):
        if not -n <= position < n:
            raise InputError(f"position {position} is out of range for fact {item.fact.known_id!r} "
                             f"({n} tokens); use a smaller index or a named position "
                             f"({', '.join(POSITION_NAMES)})")
        return position % n
    table = {
        "first": 0,
        "subject_first": item.subject_positions[0],
        "subject_last": item.subject_positions[-1],
        "after_subject": min(item.subject_positions[-1] + 1, n - 1),
        "last": n - 1,
    }
    if position not in table:
        raise InputError(
            f"unknown position {position!r}; use one of {', '.join(POSITION_NAMES)} or a token index")
    return table[position]


def batch_positions(batch: FactBatch, position: str | int) -> torch.Tensor:
    """``[B]`` token index of ``position`` in each row of a batch (on the batch's device)."""
    return torch.tensor([position_index(item, position) for item in batch.items], device=batch.ids.device)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for a batch-first ``[B, T, d]`` tensor -> ``[B, d]``."""
    return x[torch.arange(x.shape[0], device=x.device), index.to(x.device)]


def project_topk(adapter: LMAdapter, vectors: torch.Tensor, k: int, final_norm: bool = True,
                 chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` log-probabilities and token ids ``[N, k]`` of vectors ``[N, d]`` read through the model's
    head (``final_norm``: with the final norm), ``chunk_size`` rows of full-vocabulary scores at a time."""
    if k < 1:
        raise InputError(f"k={k} must be >= 1")
    k = min(k, adapter.vocab_size)
    values, ids = [], []
    for chunk in _chunks(vectors, chunk_size):
        lp = adapter.project(chunk, final_norm=final_norm).float()
        top = lp.topk(k, dim=-1)
        values.append(top.values)
        ids.append(top.indices)
    if not values:
        return vectors.new_zeros(0, k).float(), torch.zeros(0, k, dtype=torch.long, device=vectors.device)
    return torch.cat(values), torch.cat(ids)


def numbered_batches(adapter: LMAdapter, encoded: Sequence[EncodedFact],
                     batch_size: int) -> Iterator[tuple[int, FactBatch]]:
    """:func:`fflayers.recall.batching.fact_batches` with the index of each batch's first fact."""
    offset = 0
    for batch in fact_batches(adapter, encoded, batch_size):
        yield offset, batch
        offset += len(batch)


def rows_by_fact(rows: list[tuple[int, dict]]) -> list[dict]:
    """Rows tagged with their fact's index, fact by fact (stable within a fact)."""
    return [row for _, row in sorted(rows, key=lambda t: t[0])]


def _chunks(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], size):
        yield x[i : i + size]


def _check_points(points: Sequence[str]) -> list[str]:
    bad = [p for p in points if p not in PROJECTABLE_POINTS]
    if bad or not points:
        raise InputError(f"cannot project hook point {', '.join(bad) or '(none)'}; "
                           f"choose from {', '.join(PROJECTABLE_POINTS)}")
    return list(points)


@torch.inference_mode()
def vocabulary_projections(
    adapter: LMAdapter,
    encoded: Sequence[EncodedFact],
    points: Sequence[str] = ("resid_post", "attn_out", "mlp_out"),
    layers: Sequence[int] | None = None,
    positions: Sequence[str | int] = ("last",),
    k: int = 10,
    final_norm: bool = True,
    batch_size: int = 16,
    with_tokens: bool = True,
) -> pd.DataFrame:
    """Top-``k`` tokens of each hook point, layer and position of each fact.

    One row per fact x point x layer x position x rank: ``known_id``, ``subject``, ``point``, ``layer``,
    ``position`` (as asked), ``token_position`` (its index), ``rank`` (1 = top), ``token`` (empty when
    ``with_tokens`` is False, e.g. a model without tokenizer), ``token_id``, ``logprob``.
    """
    from fflayers.hooks import capture

    points = _check_points(points)
    layers = list(range(adapter.n_layers)) if layers is None else [adapter.check_layer(x) for x in layers]
    if not layers or not positions:
        raise InputError("choose at least one layer and one position")
    for item in encoded[:1]:
        for pos in positions:
            position_index(item, pos)  # fail early on a bad position
    rows: list[tuple[int, dict]] = []  # (fact index, row): rows come out fact by fact
    for offset, batch in numbered_batches(adapter, encoded, batch_size):
        with capture(adapter, points, layers) as cache:
            adapter.run(batch.ids, batch.mask)
        index = {pos: batch_positions(batch, pos) for pos in positions}
        keys = [(p, layer, pos) for p in points for layer in layers for pos in positions]
        vectors = torch.stack([gather_rows(cache[p, layer], index[pos])
                               for p, layer, pos in keys])  # [K, B, d]
        values, ids = project_topk(adapter, vectors.reshape(-1, vectors.shape[-1]), k, final_norm)
        B = len(batch)
        values = values.reshape(len(keys), B, -1).cpu()
        ids = ids.reshape(len(keys), B, -1).cpu()
        for ki, (p, layer, pos) in enumerate(keys):
            for b, item in enumerate(batch.items):
                tpos = int(index[pos][b])
                for r in range(ids.shape[-1]):
                    rows.append((offset + b, {"known_id": item.fact.known_id, "subject": item.fact.subject,
                                 "point": p, "layer": layer, "position": str(pos), "token_position": tpos,
                                 "rank": r + 1, "token_id": int(ids[ki, b, r]),
                                 "logprob": float(values[ki, b, r])}))
    table = pd.DataFrame(rows_by_fact(rows),
                         columns=["known_id", "subject", "point", "layer", "position", "token_position",
                                  "rank", "token_id", "logprob"])
    tokens = _token_strings(adapter, table["token_id"].tolist()) if with_tokens else [""] * len(table)
    table.insert(7, "token", tokens)
    return table


def _token_strings(adapter: LMAdapter, ids: list[int]) -> list[str]:
    unique = sorted(set(ids))
    strings = dict(zip(unique, adapter.vocab.id_to_token(unique), strict=True)) if unique else {}
    return [strings[i] for i in ids]
