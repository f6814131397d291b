"""Sublayer knockout (Geva et al., 2023, section 5): cancel the updates of all MLP sublayers, or of all
attention sublayers, in a window of layers and measure the subject's attributes rate and the attribute's
probability.

For each start layer ``s`` the window is ``[s, min(s + window, L - 1)]`` (``window=10``: 11 layers, clipped at
the top); in every layer of it ``mlp_out`` (kind ``"mlp"``) or ``attn_out`` (kind ``"attn"``) is set to zero
at every position (the sublayer adds nothing to the residual stream). The attributes rate
(:mod:`fflayers.recall.enrichment`) is read from ``resid_post`` at the chosen position (default: the subject's
last token) of the chosen layers (default: the last); the attribute probability is the model's output
probability of the attribute's first token after the prompt. Kind ``"none"`` (start -1) is the unedited model.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.recall.enrichment import AttributeScorer
from fflayers.recall.facts import EncodedFact
from fflayers.recall.projection import (
    batch_positions,
    gather_rows,
    numbered_batches,
    position_index,
    rows_by_fact,
)

__all__ = ["KNOCKOUT_KINDS", "knockout_windows", "sublayer_knockout", "sublayer_knockout_summary"]

#: kind -> hook point set to zero
KNOCKOUT_KINDS = {"mlp": "mlp_out", "attn": "attn_out"}

COLUMNS = ["known_id", "subject", "kind", "start", "end", "layer", "position", "token_position",
           "n_paragraphs", "n_kept", "n_found", "rate", "attribute_prob"]


def knockout_windows(n_layers: int, window: int = 10,
                     starts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` layer windows, ``end = min(start + window, n_layers - 1)``, for each start (default
    all)."""
    if window < 0:
        raise InputError(f"window {window} must be >= 0")
    starts = list(range(n_layers)) if starts is None else list(starts)
    for s in starts:
        if not 0 <= s < n_layers:
            raise InputError(f"start layer {s} is out of range: the model has {n_layers} layers "
                             f"(0..{n_layers - 1})")
    return [(s, min(s + window, n_layers - 1)) for s in starts]


@torch.inference_mode()
def sublayer_knockout(
    adapter: LMAdapter,
    encoded: Sequence[EncodedFact],
    paragraphs: Sequence[str],
    kinds: Sequence[str] = ("mlp", "attn"),
    window: int = 10,
    starts: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    position: str | int = "subject_last",
    top: int = 500,
    keep: int = 50,
    final_norm: bool = True,
    batch_size: int = 16,
    scorer: AttributeScorer | None = None,
) -> pd.DataFrame:
    """One row per fact x (kind, window) x measured layer (the unedited model first, kind ``"none"``):
    ``known_id``, ``subject``, ``kind``, ``start``, ``end``, ``layer``, ``position``, ``token_position``,
    ``n_paragraphs``, ``n_kept``, ``n_found``, ``rate`` (NaN without paragraphs) and ``attribute_prob``."""
    from fflayers.hooks import capture, intervene, replace

    for kind in kinds:
        if kind not in KNOCKOUT_KINDS:
            raise InputError(f"unknown knockout kind {kind!r}; use {' or '.join(KNOCKOUT_KINDS)}")
    layers = [adapter.n_layers - 1] if layers is None else [adapter.check_layer(x) for x in layers]
    windows = knockout_windows(adapter.n_layers, window, starts)
    for item in encoded[:1]:
        position_index(item, position)
    scorer = scorer or AttributeScorer(adapter, top=top, keep=keep, final_norm=final_norm)
    scorer.add_paragraphs([e.fact.subject for e in encoded], paragraphs)
    runs = [("none", -1, -1)] + [(kind, s, e) for kind in kinds for s, e in windows]
    rows: list[tuple[int, dict]] = []  # (fact index, row): rows come out fact by fact
    for offset, batch in numbered_batches(adapter, encoded, batch_size):
        B = len(batch)
        index = batch_positions(batch, position)
        subjects = [item.fact.subject for item in batch.items]
        targets = torch.tensor([item.attribute_id for item in batch.items], device=adapter.device)
        for kind, start, end in runs:
            edits = [] if kind == "none" else [replace(KNOCKOUT_KINDS[kind], layer, 0.0)
                                                for layer in range(start, end + 1)]
            with capture(adapter, "resid_post", layers) as cache, intervene(adapter, edits):
                h = adapter.run(batch.ids, batch.mask)
            probs = (adapter.project(gather_rows(h, batch.last)).float()
                     .gather(1, targets[:, None])[:, 0].exp())
            vectors = torch.cat([gather_rows(cache["resid_post", layer], index) for layer in layers])
            scores = scorer.rates(vectors, subjects * len(layers))
            for li, layer in enumerate(layers):
                for b, item in enumerate(batch.items):
                    n_kept, n_found = scores[li * B + b]
                    n_par = scorer.subject_paragraphs[item.fact.subject]
                    rows.append((offset + b, {"known_id": item.fact.known_id, "subject": item.fact.subject,
                                 "kind": kind, "start": start, "end": end, "layer": layer,
                                 "position": str(position), "token_position": int(index[b]),
                                 "n_paragraphs": n_par, "n_kept": n_kept, "n_found": n_found,
                                 "rate": n_found / n_kept if n_par and n_kept else float("nan"),
                                 "attribute_prob": float(probs[b])}))
    return pd.DataFrame(rows_by_fact(rows), columns=COLUMNS)


def sublayer_knockout_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per kind x start x measured layer: ``n_facts``, mean ``rate`` (facts with paragraphs) and mean
    ``attribute_prob`` (all facts)."""
    keys = ["kind", "start", "end", "layer"]
    probs = table.groupby(keys, sort=False).agg(n_facts=("known_id", "size"),
                                                attribute_prob=("attribute_prob", "mean"))
    rates = table.dropna(subset=["rate"]).groupby(keys, sort=False)["rate"].mean()
    return probs.join(rates).reset_index()[[*keys, "n_facts", "rate", "attribute_prob"]]
