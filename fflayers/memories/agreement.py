"""Key-value agreement: does a value's top prediction match the tokens its key's trigger examples predict?

For every value ``v_i`` of layer ``l``: ``p_i = P(v_i)``, the model's own output head applied to the value
(:meth:`LMAdapter.project`: final norm where the model has one, the real output layer in eval mode, fairseq's
adaptive softmax with its trained cluster and tail projections included). For key ``(l, i)``, the targets are
the tokens its trigger examples predict: in a textual trigger file the starred token, i.e. the token *after*
the trigger position (the hidden state at position t predicts token t+1).

Per value the table holds (column names of the original ``key_value_agreement.py``):

* ``layer``, ``W2_dim``: the value's layer and index;
* ``max_prob``: ``max p_i``; ``embedding_index`` / ``embedding_token``: its argmax and token string;
* ``embedding_token_target_count``: how many trigger targets equal the top-1 token;
* ``target_rankings``: the rank of each trigger target under ``p_i`` (0 = top-1; rank = number of tokens with
  a strictly larger probability), in trigger order (largest key activation first). Values whose key has no
  trigger examples get ``[]`` and count 0.

Subword models: the exact target ids stored beside the textual files (``target_ids.jsonl``, the token that
follows the trigger position in the tokenized sentence) are used. Otherwise (word-level dictionaries, older
folders) target strings are mapped to ids with :func:`target_id` (subword vocabularies: the spaced form after
a prefix); targets that are not one vocabulary entry are mapped to the model's unknown-token id (fairseq
``<unk>``, the tokenizer's ``unk_token_id``) and ranked as that token; a model without one gets rank ``-1``.

Memory stays bounded: values are projected ``chunk_values`` at a time and ranks are counted against each
chunk's log-probs with a sort of the (few) targets and one bucketing pass over the vocabulary, so nothing
of size ``[all values, vocab]`` exists (the original held every value's log-probs at once: ~150 GB for
WikiText-103).

Where fflayers differs from the original code (both are departures of that code from the paper):

1. The original built a fresh adaptive softmax and copied only the embedding weights into it, so the cluster
   and tail projections were random and dropout was on. fflayers uses the model's trained output layer in
   eval mode.
2. The original took the token *before* the starred one as each trigger's target. fflayers takes the starred
   token: the next token, the one the trigger position predicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fflayers.allocator import steady_heap
from fflayers.backends.base import LMAdapter
from fflayers.backends.vocabulary import Vocabulary
from fflayers.core import InputError
from fflayers.memories.value_projections import (
    default_chunk_rows,
    full_precision,
    random_values,
)
from fflayers.runs.accumulators import PiecesTask, UnitPieces

__all__ = [
    "AGREEMENT_COLUMNS",
    "count_greater",
    "target_id",
    "targets_from_examples",
    "key_value_agreement",
    "agreement_units",
    "agreement_frames",
    "AgreementConfig",
    "AgreementTask",
    "max_probs_by_layer",
    "agreement_by_layer",
]

AGREEMENT_COLUMNS = ["layer", "W2_dim", "max_prob", "embedding_index", "embedding_token",
                     "embedding_token_target_count", "target_rankings"]

Key = tuple[int, int]


def count_greater(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``out[r, k] = #{j : scores[r, j] > thresholds[r, k]}`` (exact, strict), as int64 ``[R, K]``.

    Sorts the ``K`` thresholds of each row and buckets every score among them (``searchsorted``, int32
    buckets, updated in place), then counts with one ``bincount``: ``O(R V log K)`` time and ``O(R V)``
    memory, never ``[R, K, V]``. NaN scores never count.
    """
    R, V = scores.shape
    K = thresholds.shape[1]
    if K == 0:
        return torch.zeros(R, 0, dtype=torch.long, device=scores.device)
    thresholds = thresholds.to(scores.dtype)
    sorted_t, order = thresholds.sort(dim=1)
    # bucket b(x) = number of thresholds strictly below x; x > sorted_t[k]  <=>  b(x) >= k + 1
    small = R * (K + 1) < 2**31
    bucket = torch.searchsorted(sorted_t.contiguous(), scores.contiguous(), right=False, out_int32=small)
    bucket.masked_fill_(torch.isnan(scores), 0)
    offsets = bucket.add_(torch.arange(R, device=scores.device, dtype=bucket.dtype)[:, None] * (K + 1))
    hist = torch.bincount(offsets.reshape(-1), minlength=R * (K + 1)).reshape(R, K + 1)
    at_least = hist.flip(1).cumsum(1).flip(1)  # at_least[:, j] = #{b(x) >= j}
    out = torch.empty(R, K, dtype=torch.long, device=scores.device)
    out.scatter_(1, order, at_least[:, 1:])
    return out


def target_id(vocab: Vocabulary, token: str, after_prefix: bool = True) -> int | None:
    """Token id of a trigger target string, or None when it is not one vocabulary entry.

    Textual files strip the target's leading space, so after a non-empty prefix the spaced form is tried first
    (``" Paris"``: GPT-2 BPE), then the bare form (word-level dictionaries, SentencePiece). The
    end-of-sentence target ``</s>`` falls back to the vocabulary's EOS id.
    """
    candidates = [" " + token, token] if after_prefix and token and not token[0].isspace() else [token]
    for cand in candidates:
        tid = vocab.token_to_id(cand)
        if tid is not None:
            return int(tid)
    return vocab.eos_id if token == "</s>" else None


def targets_from_examples(
    adapter: LMAdapter,
    examples: Mapping[Key, Sequence[tuple[float, str, str]]],
    target_ids: Mapping[Key, Sequence[int]] | None = None,
) -> tuple[dict[Key, list[int]], int]:
    """Trigger targets as token ids per key, from ``{(layer, dim): [(fc1_value, prefix, target_token)]}``
    (what :func:`fflayers.memories.textual.read_textual_dir` returns).

    ``target_ids`` (:func:`fflayers.memories.textual.read_target_ids`): the exact ids, one per line of each
    key's file, used as they are. Keys without them map their strings with :func:`target_id`; strings not in
    the vocabulary become the unknown-token id (-1 when the model has none) and are counted.
    Each key's targets are ordered by activation, largest first (stable: the file order for equal values).
    Returns ``(targets, n_unknown)``.
    """
    unk = adapter.vocab.unk_id
    cache: dict[tuple[str, bool], int | None] = {}
    n_unknown = 0
    out: dict[Key, list[int]] = {}
    for key, rows in examples.items():
        key = (int(key[0]), int(key[1]))
        order = sorted(range(len(rows)), key=lambda j: -float(rows[j][0]))
        stored = None if target_ids is None else target_ids.get(key)
        if stored is not None:
            if len(stored) != len(rows):
                raise InputError(
                    f"the stored target ids of key {key} ({len(stored)}) do not match its {len(rows)} "
                    "trigger lines; rerun trigger_examples_jsonl_to_textual.py into an empty folder"
                )
            out[key] = [int(stored[j]) for j in order]
            continue
        ids = []
        for j in order:
            _value, prefix, token = rows[j]
            ck = (token, bool(prefix))
            if ck not in cache:
                cache[ck] = target_id(adapter.vocab, token, after_prefix=bool(prefix))
            tid = cache[ck]
            if tid is None:
                n_unknown += 1
                tid = unk if unk is not None else -1
            ids.append(tid)
        out[key] = ids
    return out, n_unknown


def _check_targets(adapter: LMAdapter, targets: Mapping[Key, Sequence[int]]) -> None:
    d_ff, vocab = adapter.d_ff, adapter.vocab_size
    for (layer, dim), ids in targets.items():
        if not 0 <= layer < adapter.n_layers:
            raise InputError(f"trigger examples for layer {layer}, but the model has {adapter.n_layers} "
                             f"layers (0..{adapter.n_layers - 1}); "
                             "use trigger examples mined from this model")
        if not 0 <= dim < d_ff:
            raise InputError(f"trigger examples for dim {dim} of layer {layer}, but layers have {d_ff} dims; "
                               "use trigger examples mined from this model")
        for t in ids:
            if not -1 <= int(t) < vocab:
                raise InputError(
                    f"target id {t} of key ({layer}, {dim}) is outside the vocabulary of {vocab}")


def agreement_units(adapter: LMAdapter, layers: Iterable[int] | None = None,
                    chunk_values: int | None = None) -> list[tuple[int, int, int]]:
    """The work of :func:`key_value_agreement` as ``(layer, first_dim, end_dim)`` projection chunks, in output
    order; a torchrun job splits this list over its ranks (each chunk is computed the same way wherever it
    runs)."""
    chunk = chunk_values or default_chunk_rows(adapter, 1 << 24)
    if chunk < 1:
        raise InputError(f"chunk size {chunk} must be >= 1")
    n = adapter.d_ff
    return [(layer, s, min(n, s + chunk)) for layer in adapter.check_layers(layers)
            for s in range(0, n, chunk)]


def agreement_frames(
    adapter: LMAdapter,
    targets: Mapping[Key, Sequence[int]],
    units: Sequence[tuple[int, int, int]],
    random_baseline: bool = False,
    seed: int = 0,
) -> Iterator[pd.DataFrame]:
    """The rows (a table of :data:`AGREEMENT_COLUMNS`) of each chunk of ``units`` in turn (see
    :func:`key_value_agreement`); a layer's values and target table are prepared once per run of its chunks.
    ``targets`` are checked at once."""
    _check_targets(adapter, targets)
    steady_heap()  # per-chunk buffers of a few MB would otherwise fragment the heap (GBs over 16 layers)
    return _frames(adapter, targets, units, random_baseline, seed)


def _frames(adapter, targets, units, random_baseline, seed) -> Iterator[pd.DataFrame]:
    current = None
    with torch.no_grad():
        for layer, s, e in units:
            if current is None or current[0] != layer:
                values = (random_values(adapter, layer, seed) if random_baseline
                          else adapter.ffn_values(layer).detach())
                per_dim = [list(targets.get((layer, i), ())) for i in range(values.shape[0])]
                width = max((len(t) for t in per_dim), default=0)
                tgt = torch.full((len(per_dim), width), -1, dtype=torch.long)
                for i, ids in enumerate(per_dim):
                    if ids:
                        tgt[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
                current = (layer, values, per_dim, width, tgt)
            _, values, per_dim, width, tgt = current
            yield _agreement_rows(adapter, layer, values, s, e, per_dim, width, tgt)


def key_value_agreement(
    adapter: LMAdapter,
    targets: Mapping[Key, Sequence[int]],
    layers: Iterable[int] | None = None,
    chunk_values: int | None = None,
    random_baseline: bool = False,
    seed: int = 0,
    progress: bool = False,
    units: Sequence[tuple[int, int, int]] | None = None,
) -> pd.DataFrame:
    """The agreement table (see the module docstring) for every value of the chosen layers (default: all).

    ``targets`` maps ``(layer, dim)`` to trigger target token ids (``-1``: unknown, ranked -1).
    ``chunk_values`` bounds the values projected at once (default: about 16M log-probs per chunk).
    ``random_baseline=True`` replaces each value by a random vector with its norm (the chance level).
    ``units``: only these chunks of :func:`agreement_units` (their rows, in the order given).
    """
    if units is None:
        units = agreement_units(adapter, layers, chunk_values)
    rows = agreement_frames(adapter, targets, units, random_baseline, seed)
    frames = []
    bar = tqdm(total=sum(e - s for _, s, e in units), desc="key-value agreement", disable=not progress)
    for (_, s, e), frame in zip(units, rows, strict=True):
        frames.append(frame)
        bar.update(e - s)
    bar.close()
    return pd.concat(frames, ignore_index=True)[AGREEMENT_COLUMNS]


def _agreement_rows(adapter, layer, values, s, e, per_dim, width, tgt) -> pd.DataFrame:
    lp = full_precision(adapter.project(values[s:e], chunk_size=e - s))
    best, arg = lp.max(dim=1)
    max_prob = best.exp().double().cpu().numpy()
    top1 = arg.cpu().numpy()
    ranks = np.full((e - s, width), -1, dtype=np.int64)
    t_rows = tgt[s:e]
    if width:
        t = t_rows.to(lp.device)
        known = t >= 0
        thr = lp.gather(1, t.clamp_min(0)).masked_fill(~known, float("inf"))
        ranks = count_greater(lp, thr).masked_fill(~known, -1).cpu().numpy()
    tgt_np = t_rows.numpy()
    counts = ((tgt_np == top1[:, None]) & (tgt_np >= 0)).sum(1) if width else np.zeros(e - s, dtype=np.int64)
    return pd.DataFrame({
        "layer": np.full(e - s, layer, dtype=np.int64),
        "W2_dim": np.arange(s, e, dtype=np.int64),
        "max_prob": max_prob,
        "embedding_index": top1,
        "embedding_token": adapter.vocab.id_to_token(top1.tolist()),
        "embedding_token_target_count": counts.astype(np.int64),
        "target_rankings": [ranks[i, : len(per_dim[s + i])].tolist() for i in range(e - s)],
    })


def max_probs_by_layer(table: pd.DataFrame, n_layers: int) -> list[list[float] | None]:
    """``[L][d_ff]`` max probabilities from an agreement table (``None`` for layers not in the table)."""
    out: list[list[float] | None] = [None] * n_layers
    for layer, group in table.groupby("layer", sort=True):
        group = group.sort_values("W2_dim")
        out[int(layer)] = [float(p) for p in group["max_prob"]]
    return out


def _rankings(value) -> list[int]:
    if isinstance(value, str):
        import json

        return [int(v) for v in json.loads(value)]
    return [int(v) for v in value]


def agreement_by_layer(table: pd.DataFrame) -> pd.DataFrame:
    """Per-layer summary of an agreement table, over the values whose key has trigger examples.

    ``with_triggers``: number of such values; ``top1_in_targets``: share whose top-1 equals at least one
    trigger target; ``agreement_rate``: share whose top-1 equals the target of the key's top trigger example
    (the paper's agreement rate); ``mean_max_prob``: mean ``max_prob`` over all values of the layer.
    """
    rankings = table["target_rankings"].map(_rankings)
    has = rankings.map(len) > 0
    top_match = rankings.map(lambda r: bool(r) and r[0] == 0)
    any_match = table["embedding_token_target_count"] > 0
    frame = pd.DataFrame({"layer": table["layer"], "has": has, "any": any_match & has, "top": top_match,
                          "max_prob": table["max_prob"]})
    rows = []
    for layer, g in frame.groupby("layer", sort=True):
        n = int(g["has"].sum())
        rows.append({
            "layer": int(layer),
            "values": len(g),
            "with_triggers": n,
            "top1_in_targets": float(g["any"].sum() / n) if n else float("nan"),
            "agreement_rate": float(g["top"].sum() / n) if n else float("nan"),
            "mean_max_prob": float(g["max_prob"].mean()),
        })
    return pd.DataFrame(rows)


# ----- as a run of fflayers.runs -------------------------------------------------------------------------

@dataclass(frozen=True)
class AgreementConfig:
    """What an agreement run computes (with the model and textual-folder fingerprints: its resume key):
    the layers, the values per chunk as asked (None: sized from the vocabulary), the random baseline and its
    seed."""

    layers: list[int]
    chunk_values: int | None
    random_baseline: bool
    seed: int


class AgreementTask(PiecesTask):
    """Key-value agreement as a :class:`fflayers.runs.UnitTask` (``targets`` are checked at once). The units
    are the chunks of :func:`agreement_units` and, with ``random_baseline``, the same chunks again for the
    random vectors; a part is a :class:`fflayers.runs.UnitPieces` of row blocks (one per run of consecutive
    units of one table, keyed by its first unit), so merging is concatenating in unit order, whatever the
    order of the parts."""

    kind = "agreement"

    def __init__(self, adapter: LMAdapter, targets: Mapping[Key, Sequence[int]],
                 layers: Iterable[int] | None = None, chunk_values: int | None = None,
                 random_baseline: bool = False, seed: int = 0) -> None:
        _check_targets(adapter, targets)
        self.adapter, self.targets, self.seed = adapter, targets, seed
        self.layers = adapter.check_layers(layers)
        self.config = AgreementConfig(self.layers, chunk_values, random_baseline, seed)
        self.chunks = agreement_units(adapter, self.layers, chunk_values)
        self.n_units = len(self.chunks) * (2 if random_baseline else 1)

    def unit_weight(self, unit: int) -> int:
        """The values of a unit."""
        _, s, e = self.chunks[unit % len(self.chunks)]
        return e - s

    def run_units(self, units: range, progress: Callable[[int], object]) -> UnitPieces:
        """The rows of ``units``; ``progress(n)`` after each chunk of ``n`` values."""
        n, part = len(self.chunks), UnitPieces()
        for random_baseline in (False, True):
            block = [u for u in units if (u >= n) == random_baseline]
            if not block:
                continue
            chunks = [self.chunks[u % n] for u in block]
            frames = []
            steady_heap()
            rows = _frames(self.adapter, self.targets, chunks, random_baseline, self.seed)  # targets checked
            for (_, s, e), frame in zip(chunks, rows, strict=True):
                frames.append(frame)
                progress(e - s)
            part.add(block[0], pd.concat(frames, ignore_index=True))
        return part

    def tables(self, merged: UnitPieces) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        """The agreement table and the random-baseline table (None without one) of the merged pieces, which
        are taken out of ``merged`` (each table's pieces go once it holds their rows)."""
        n = len(self.chunks)
        real = [frame for u, frame in merged.items() if u < n]
        rand = [frame for u, frame in merged.items() if u >= n]
        merged.clear()
        table = pd.concat(real, ignore_index=True)[AGREEMENT_COLUMNS]
        real.clear()
        return table, (pd.concat(rand, ignore_index=True)[AGREEMENT_COLUMNS] if rand else None)
