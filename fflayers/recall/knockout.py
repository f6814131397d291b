"""Attention knockout: block the edges from the last position to a set of positions in a window of layers and
measure how much the probability of the model's original prediction changes (Geva et al., 2023, section 4).

For layer ``l`` and window ``k`` the edges are blocked in every head of layers ``max(0, l - k//2)`` ..
``min(L - 1, l + k//2)``. The position sets, over the positions before the last one unless said otherwise:

* ``subject``: the subject's tokens (the last position too when the subject ends the prompt);
* ``non_subject``: every position before the last that is not a subject token (position 0 included);
* ``last``: the last position itself (its edge to itself);
* ``first``: position 0 alone (BOS / fairseq's ``</s>`` where the model has one, else the first word);
* ``non_subject_excl_first``: ``non_subject`` without position 0.

The metric is ``rel_change_pct = 100 * (p_new - p) / p`` with ``p`` the probability of the model's top-1 next
token on the unmodified prompt and ``p_new`` that token's probability with the edges blocked. An empty set
blocks nothing: its ``p_new`` is ``p`` itself.

Many (layer, set) combinations run in one forward pass: the facts are repeated once per combination, and each
row carries its own blocked-edge mask in every layer (:func:`fflayers.hooks.block_attention` takes
``[B, T, S]`` masks), so rows of one batch knock out different sets in different windows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.hooks import block_attention
from fflayers.recall.batching import FactBatch, make_fact_batch
from fflayers.recall.facts import EncodedFact

#: every position set, in the order of the tables
KNOCKOUT_SETS: tuple[str, ...] = ("subject", "non_subject", "last", "first", "non_subject_excl_first")
#: the paper's three sets
DEFAULT_SETS: tuple[str, ...] = ("subject", "non_subject", "last")
COLUMNS = ["known_id", "subject", "attribute", "set", "layer", "window_start", "window_end", "p", "p_new",
           "rel_change_pct"]


def knockout_position_sets(item: EncodedFact) -> dict[str, list[int]]:
    """The positions of every set in :data:`KNOCKOUT_SETS` for one fact (see the module docstring)."""
    last = item.last
    subject = set(item.subject_positions)
    non_subject = [p for p in range(last) if p not in subject]
    return {
        "subject": sorted(subject),
        "non_subject": non_subject,
        "last": [last],
        "first": [0] if last > 0 else [],
        "non_subject_excl_first": [p for p in non_subject if p != 0],
    }


def layer_window(layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """First and last layer (inclusive) of the window of ``window`` layers around ``layer``."""
    return max(0, layer - window // 2), min(n_layers - 1, layer + window // 2)


def _check(adapter: LMAdapter, layers: Sequence[int] | None, sets: Sequence[str], window: int) -> list[int]:
    if adapter.is_masked_lm:
        raise InputError(f"attention knockout needs a causal LM; this {adapter.family} model is a masked LM")
    unknown = [s for s in sets if s not in KNOCKOUT_SETS]
    if unknown or not sets:
        raise InputError(f"unknown knockout set {unknown[0] if unknown else None!r}; choose from "
                           f"{', '.join(KNOCKOUT_SETS)}")
    if window < 1:
        raise InputError(f"window {window} must be >= 1 layer")
    layers = range(adapter.n_layers) if layers is None else layers
    return sorted({adapter.check_layer(layer) for layer in layers})


@torch.inference_mode()
def _predictions(adapter: LMAdapter, batch: FactBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 token ``[B]`` at each row's last position and its probability ``[B]`` (float64)."""
    h = adapter.run(batch.ids, batch.mask)
    rows = torch.arange(len(batch), device=h.device)
    lp = adapter.project(h[rows, batch.last]).double()
    target = lp.argmax(-1)
    return target, lp.gather(1, target[:, None])[:, 0].exp()


def _window_edges(keys: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> dict[int, torch.Tensor]:
    """Layer -> the last position's blocked edges ``[R, T]`` in that layer: row ``r``'s ``keys[r]`` where
    ``lo[r] <= layer <= hi[r]``, none elsewhere; layers that no row's window reaches are left out."""
    out = {}
    for layer in range(int(lo.min()), int(hi.max()) + 1):
        inside = (lo <= layer) & (layer <= hi)
        if inside.any():
            out[layer] = keys & inside[:, None]
    return out


@torch.inference_mode()
def _knocked_out(adapter: LMAdapter, batch: FactBatch, rows: torch.Tensor, keys: torch.Tensor,
                 lo: torch.Tensor, hi: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Probability of ``target`` for rows ``rows`` of ``batch``, each row blocking last -> ``keys[r]`` (bool
    ``[R, T]``) in layers ``lo[r]..hi[r]``; one forward pass."""
    T = int(batch.last[rows].max()) + 1
    ids, mask, last = batch.ids[rows, :T], batch.mask[rows, :T], batch.last[rows]
    keys = keys[:, :T]
    R = len(rows)
    index = torch.arange(R, device=ids.device)
    blocked = {}
    for layer, edges in _window_edges(keys, lo, hi).items():
        m = torch.zeros(R, T, T, dtype=torch.bool, device=ids.device)
        m[index, last] = edges
        blocked[layer] = m
    with block_attention(adapter, blocked):
        h = adapter.run(ids, mask)
    lp = adapter.project(h[index, last])
    return lp.gather(1, target[:, None])[:, 0].double().exp()


@torch.inference_mode()
def _knocked_out_cached(adapter: LMAdapter, ids: list[int], keys: torch.Tensor, lo: torch.Tensor,
                        hi: torch.Tensor, target: int) -> torch.Tensor | None:
    """As :func:`_knocked_out` for ``R`` rows of one prompt ``ids``, its positions before the last computed
    once (a key/value cache: the blocked edges start at the last position, so nothing before it changes) and
    only the last position run per row; None when the adapter cannot cache a prefix."""
    T, R = len(ids), len(keys)
    prompt = torch.tensor([ids], device=adapter.device)
    cache = adapter.prefix_cache(prompt[:, : T - 1], R) if T > 1 else None
    if cache is None:
        return None
    blocked = {layer: edges[:, None, :] for layer, edges in _window_edges(keys, lo, hi).items()}  # [R, 1, T]
    with block_attention(adapter, blocked):
        h = adapter.run_cached(cache, prompt[:, T - 1 :].expand(R, 1))
    return adapter.project(h[:, -1])[:, target].double().exp()


def _cached_rows(adapter: LMAdapter, items: list[EncodedFact], fact_idx: torch.Tensor,
                 combo_idx: torch.Tensor, keys: torch.Tensor, combo_set: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor, target: torch.Tensor, p_new: torch.Tensor,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill ``p_new`` for the rows whose fact can use a prefix cache, ``batch_size`` rows per pass; returns
    the rows left for whole-prompt passes."""
    left = torch.ones(len(fact_idx), dtype=torch.bool, device=fact_idx.device)
    for b, item in enumerate(items):
        rows = torch.nonzero(fact_idx == b).flatten()
        for r0 in range(0, len(rows), batch_size):
            r = rows[r0 : r0 + batch_size]
            ci = combo_idx[r]
            got = _knocked_out_cached(adapter, item.ids, keys[b, combo_set[ci], : len(item.ids)], lo[ci],
                                      hi[ci], int(target[b]))
            if got is None:
                break
            p_new[b, ci] = got
            left[r] = False
    return fact_idx[left], combo_idx[left]


def attention_knockout(
    adapter: LMAdapter,
    encoded: Sequence[EncodedFact],
    layers: Sequence[int] | None = None,
    sets: Sequence[str] = DEFAULT_SETS,
    window: int = 9,
    batch_size: int = 64,
    on_facts_done: Callable[[int], object] | None = None,
    prefix_cache: bool = True,
) -> pd.DataFrame:
    """Attention knockout of every fact x layer (default: all) x set; one row each, columns :data:`COLUMNS`.

    ``batch_size`` is the number of rows (fact x layer x set combinations, each a copy of one prompt) per
    forward pass; facts are taken ``ceil(batch_size / combinations)`` at a time. ``prefix_cache``: where the
    adapter can cache a prefix (HF causal LMs), each fact's positions before the last run once and every row
    runs only the last position (the same probabilities, to float rounding); else whole prompts per row.
    ``on_facts_done(n)`` is called after each group of ``n`` facts (a progress bar's ``update``).
    """
    layers = _check(adapter, layers, sets, window)
    if batch_size < 1:
        raise InputError(f"batch_size {batch_size} must be >= 1")
    dev = adapter.device
    combos = [(layer, s) for layer in layers for s in sets]
    C = len(combos)
    windows = [layer_window(layer, window, adapter.n_layers) for layer, _ in combos]
    combo_lo = torch.tensor([w[0] for w in windows], device=dev)
    combo_hi = torch.tensor([w[1] for w in windows], device=dev)
    combo_set = torch.tensor([sets.index(s) for _, s in combos], device=dev)
    facts_per_group = max(1, -(-batch_size // C))
    records = []
    for start in range(0, len(encoded), facts_per_group):
        items = list(encoded[start : start + facts_per_group])
        batch = make_fact_batch(adapter, items)
        B, T = batch.ids.shape
        target, p = _predictions(adapter, batch)
        keys = torch.zeros(B, len(sets), T, dtype=torch.bool)
        for b, item in enumerate(items):
            positions = knockout_position_sets(item)
            for s, name in enumerate(sets):
                keys[b, s, positions[name]] = True
        keys = keys.to(dev)
        p_new = p[:, None].repeat(1, C)  # empty sets keep p exactly
        # rows = (fact, combination) pairs with something to block, combination-major
        fact_idx = torch.arange(B, device=dev).repeat(C)
        combo_idx = torch.arange(C, device=dev).repeat_interleave(B)
        nonempty = keys[fact_idx, combo_set[combo_idx]].any(-1)
        fact_idx, combo_idx = fact_idx[nonempty], combo_idx[nonempty]
        if prefix_cache:
            fact_idx, combo_idx = _cached_rows(adapter, items, fact_idx, combo_idx, keys, combo_set, combo_lo,
                                               combo_hi, target, p_new, batch_size)
        for r0 in range(0, len(fact_idx), batch_size):
            fi, ci = fact_idx[r0 : r0 + batch_size], combo_idx[r0 : r0 + batch_size]
            p_new[fi, ci] = _knocked_out(adapter, batch, fi, keys[fi, combo_set[ci]], combo_lo[ci],
                                         combo_hi[ci], target[fi])
        p_cpu, p_new_cpu = p.tolist(), p_new.tolist()
        for b, item in enumerate(items):
            fact = item.fact
            for c, (layer, name) in enumerate(combos):
                pn = p_new_cpu[b][c]
                records.append((fact.known_id, fact.subject, fact.attribute, name, layer, windows[c][0],
                                windows[c][1], p_cpu[b], pn, 100.0 * (pn - p_cpu[b]) / p_cpu[b]))
        if on_facts_done is not None:
            on_facts_done(len(items))
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def knockout_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean ``rel_change_pct`` per layer (rows) and set (columns)."""
    return table.pivot_table(index="layer", columns="set", values="rel_change_pct", aggfunc="mean")
