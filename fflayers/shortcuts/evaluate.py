"""How well shortcuts from intermediate states predict the model's final output (precision@k, surprisal).

States are ``[n, L+1, d]`` (state 0 = embeddings, state l = output of block l-1, state L before the final
norm); maps are ``{(j, i): A}`` with ``x_j ≈ A @ x_i``. Two shortcuts from state ``i`` to the output:

* ``"id"``: ``project(x_i)``, the state read as if it were final (the "logit lens");
* ``"mat"``: ``project(A_{L,i} @ x_i)``, the state carried to the last one by a linear map first.

Both go through :meth:`LMAdapter.project` (final norm + head), as does the model's own output
``project(x_L)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError

#: Shortcut kinds, in row order.
MAPPINGS: tuple[str, ...] = ("id", "mat")

Maps = Mapping[tuple[int, int], torch.Tensor]


def check_states(adapter: LMAdapter, states: torch.Tensor) -> int:
    """Raise :class:`~fflayers.core.InputError` unless ``states`` is ``[n >= 1, L+1, d]`` for this model;
    return ``L``."""
    L, d = adapter.n_layers, adapter.d_model
    if not isinstance(states, torch.Tensor) or states.dim() != 3 or tuple(states.shape[1:]) != (L + 1, d):
        got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        raise InputError(
            f"states must be a tensor [n, {L + 1}, {d}] (the {L + 1} states of this model), got {got}")
    if states.shape[0] == 0:
        raise InputError("states holds no examples; collect the states of at least one position")
    return L


def check_mappings(mapping: str | Iterable[str]) -> tuple[str, ...]:
    """``"id"``, ``"mat"``, ``"both"`` or a sequence of the first two -> tuple of names (no repeats)."""
    if mapping == "both":
        names: tuple[str, ...] = MAPPINGS
    elif isinstance(mapping, str):
        names = (mapping,)
    else:
        names = tuple(dict.fromkeys(mapping))
    bad = [m for m in names if m not in MAPPINGS]
    if bad or not names:
        raise InputError(f"unknown mapping {bad[0] if bad else mapping!r}; choose 'id', 'mat' or 'both'")
    return names


def check_chunk(chunk: int) -> int:
    """A positive number of examples per chunk, or :class:`~fflayers.core.InputError`."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be a positive number of examples, got {chunk!r}")
    return chunk


def shortcut_maps(adapter: LMAdapter, maps: Maps | None, sources: Iterable[int]) -> dict[int, torch.Tensor]:
    """``{i: A_{L,i}}`` (float32, on the adapter's device) for each source state ``i``; a missing or
    ill-shaped map raises :class:`~fflayers.core.InputError` naming its ``(j, i)`` pair."""
    L, d = adapter.n_layers, adapter.d_model
    out = {}
    for i in sources:
        A = None if maps is None else maps.get((L, i))
        if A is None:
            raise InputError(
                f"no linear map for (j, i) = ({L}, {i}); "
                f"fit it first (fit_maps with the pair (i, j) = ({i}, {L})) or use mapping 'id'"
            )
        if tuple(A.shape) != (d, d):
            raise InputError(f"linear map ({L}, {i}) has shape {tuple(A.shape)}, expected ({d}, {d})")
        out[i] = A.detach().to(adapter.device, torch.float32)
    return out


def shortcut_log_probs(adapter: LMAdapter, x: torch.Tensor, A: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs ``[n, V]`` of rows ``x`` ``[n, d]`` through the model's head, after ``x @ A.T`` when ``A`` is
    given."""
    x = x.to(adapter.device, torch.float32)
    if A is not None:
        x = x @ A.T
    return adapter.project(x, chunk_size=max(1, x.shape[0]))


def _top1(adapter: LMAdapter, x: torch.Tensor, names: Sequence[str], A: torch.Tensor | None) -> torch.Tensor:
    """Top-1 token ``[n, M]`` of each named shortcut from rows ``x``; one ``[n, V]`` block alive at a time."""
    return torch.stack([shortcut_log_probs(adapter, x, A if m == "mat" else None).argmax(-1)
                        for m in names], -1)


def _check_ks(ks: Sequence[int], vocab: int) -> list[int]:
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab for k in ks):
        raise InputError(
            f"ks must be one or more integers between 1 and the vocabulary size {vocab}, got {ks}")
    return sorted(set(ks))


def evaluate_shortcuts(
    adapter: LMAdapter,
    states: torch.Tensor,
    maps: Maps | None,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 256,
    mappings: str | Iterable[str] = MAPPINGS,
) -> pd.DataFrame:
    """Compare the shortcut from every state ``i`` in ``0..L-1`` with the model's own final distribution.

    One row per ``(layer = i, mapping)``: ``precision@k`` (one column per k, ascending) is the share of
    examples whose shortcut top-1 token is among the model's final top-k tokens; ``surprisal`` is the mean
    over examples of ``-log2 p_final(shortcut top-1)``, in bits. ``"mat"`` needs ``maps[(L, i)]`` for every
    ``i`` (:class:`~fflayers.core.InputError` otherwise); ``mappings="id"`` leaves the "mat" rows out and
    needs no maps. Examples are processed ``chunk`` at a time, with at most one ``[chunk, V]`` block of
    log-probabilities alive at once.
    """
    L = check_states(adapter, states)
    names = check_mappings(mappings)
    ks = _check_ks(ks, adapter.vocab_size)
    chunk = check_chunk(chunk)
    mats = shortcut_maps(adapter, maps, range(L)) if "mat" in names else {}
    hits = torch.zeros(L, len(names), len(ks), dtype=torch.float64)
    bits = torch.zeros(L, len(names), dtype=torch.float64)
    n = states.shape[0]
    with torch.no_grad():
        for start in range(0, n, chunk):
            block = states[start : start + chunk]
            top1 = torch.stack([_top1(adapter, block[:, i], names, mats.get(i))
                                for i in range(L)], 1)  # [c, L, M]
            final = shortcut_log_probs(adapter, block[:, L])  # [c, V]
            top_k = final.topk(ks[-1], dim=-1).indices  # [c, K]
            inside = top_k[:, None, None, :] == top1[..., None]  # [c, L, M, K]
            for col, k in enumerate(ks):
                hits[:, :, col] += inside[..., :k].any(-1).sum(0).double().cpu()
            c = top1.shape[0]
            lp = final.gather(1, top1.reshape(c, -1)).reshape(c, L, len(names))
            bits += (-lp.double() / math.log(2)).sum(0).cpu()
    return precision_table(range(L), names, ks, hits, bits, n)


def precision_table(layers: Iterable[int], names: Sequence[str], ks: Sequence[int], hits: torch.Tensor,
                    bits: torch.Tensor, n: int) -> pd.DataFrame:
    """Rows ``layer, mapping, precision@k..., surprisal`` from hit counts ``[layers, mappings, ks]`` and
    summed surprisal bits ``[layers, mappings]`` over ``n`` examples."""
    rows = []
    for li, layer in enumerate(layers):
        for mi, m in enumerate(names):
            row = {"layer": layer, "mapping": m}
            row.update({f"precision@{k}": float(hits[li, mi, col] / n) for col, k in enumerate(ks)})
            row["surprisal"] = float(bits[li, mi] / n)
            rows.append(row)
    return pd.DataFrame(rows)


def has_output_head(adapter: LMAdapter) -> bool:
    """False for encoders without an LM/MLM head (their states can be mapped, not decoded)."""
    from fflayers.core import ModelError

    try:
        adapter.output_embeddings()
    except ModelError:
        return False
    return True
