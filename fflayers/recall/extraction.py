"""Attribute extraction events (Geva et al., 2023, section 6): which sublayer writes the attribute at the last
position.

An *extraction event* of sublayer ``s`` (``"attn"``: the attention output ``attn_out``; ``"mlp"``:
``mlp_out``) at layer ``l`` happens when the attribute's first token is the top-1 token of that sublayer's
output at the prompt's last position, read in the vocabulary (by default without the final norm: ``h @ E.T``).

Variants (the same measurement in an edited forward pass):

* ``"none"``: the model as it is;
* ``"block_subject"`` / ``"block_non_subject"`` / ``"block_last"``: in every layer the last position may not
  attend to the subject's tokens / to the tokens that are neither subject nor last (the first token included)
  / to itself (:func:`fflayers.hooks.block_attention`; a row left without edges gives a zero attention
  output);
* ``"patch_subject"``: the subject's representations stop evolving after block ``patch_layer``: at every
  block ``l > patch_layer`` the output (``resid_post``) at the subject's positions is replaced by that of
  block ``patch_layer`` in the same pass (which is still the unedited one, as no edit acts before it). Later
  positions thus read a subject representation from an early layer, without the enrichment the blocks above it
  would add. The events are counted in all layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.recall.batching import FactBatch
from fflayers.recall.facts import EncodedFact
from fflayers.recall.projection import gather_rows, numbered_batches, rows_by_fact

__all__ = ["EXTRACTION_VARIANTS", "SUBLAYERS", "extraction_events", "extraction_rates", "extraction_overview",
           "last_position_edge_masks", "target_ranks"]

EXTRACTION_VARIANTS = ("none", "block_subject", "block_non_subject", "block_last", "patch_subject")
#: sublayer name -> hook point
SUBLAYERS = {"attn": "attn_out", "mlp": "mlp_out"}
_BLOCKED_SET = {"block_subject": "subject", "block_non_subject": "non_subject", "block_last": "last"}


def last_position_edge_masks(batch: FactBatch, which: str) -> torch.Tensor:
    """Bool ``[B, T, T]``: True on the edges from each row's last position to the ``which`` positions
    (``"subject"``, ``"non_subject"`` = neither subject nor last, ``"last"``)."""
    B, T = batch.ids.shape
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    for b, item in enumerate(batch.items):
        last = item.last
        subject = set(item.subject_positions)
        if which == "subject":
            cols = sorted(subject)
        elif which == "non_subject":
            cols = [t for t in range(last) if t not in subject]
        elif which == "last":
            cols = [last]
        else:
            raise InputError(f"unknown position set {which!r}; use subject, non_subject or last")
        mask[b, last, cols] = True
    return mask.to(batch.ids.device)


def target_ranks(adapter: LMAdapter, vectors: torch.Tensor, targets: torch.Tensor, final_norm: bool = False,
                 chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For vectors ``[N, d]`` and token ids ``[N]``: the top-1 token, the target's rank (0 = top-1: no token
    scores strictly higher) and the target's log-probability, each ``[N]``."""
    top, rank, logprob = [], [], []
    for i in range(0, vectors.shape[0], chunk_size):
        lp = adapter.project(vectors[i : i + chunk_size], final_norm=final_norm).float()
        t = targets[i : i + chunk_size].to(lp.device)[:, None]
        value = lp.gather(1, t)
        top.append(lp.argmax(-1))
        rank.append((lp > value).sum(-1))
        logprob.append(value[:, 0])
    return torch.cat(top), torch.cat(rank), torch.cat(logprob)


def _variant_context(adapter: LMAdapter, batch: FactBatch, variant: str,
                     patch_layer: int) -> AbstractContextManager:
    from fflayers.hooks import Edit, block_attention, intervene

    if variant == "none":
        return nullcontext()
    if variant in _BLOCKED_SET:
        mask = last_position_edge_masks(batch, _BLOCKED_SET[variant])
        return block_attention(adapter, {layer: mask for layer in range(adapter.n_layers)})
    if variant == "patch_subject":
        B, T = batch.ids.shape
        subject = torch.zeros(B, T, 1, dtype=torch.bool, device=batch.ids.device)
        for b, item in enumerate(batch.items):
            subject[b, item.subject_positions] = True
        frozen: dict[str, torch.Tensor] = {}

        def keep(x: torch.Tensor) -> torch.Tensor:
            frozen["h"] = x
            return x

        def restore(x: torch.Tensor) -> torch.Tensor:
            return torch.where(subject, frozen["h"], x)

        edits = [Edit("resid_post", patch_layer, keep)]
        edits += [Edit("resid_post", layer, restore) for layer in range(patch_layer + 1, adapter.n_layers)]
        return intervene(adapter, edits)
    raise InputError(f"unknown extraction variant {variant!r}; choose from {', '.join(EXTRACTION_VARIANTS)}")


@torch.inference_mode()
def extraction_events(
    adapter: LMAdapter,
    encoded: Sequence[EncodedFact],
    variants: Sequence[str] = ("none",),
    patch_layer: int = 0,
    final_norm: bool = False,
    batch_size: int = 16,
) -> pd.DataFrame:
    """One row per fact x variant x sublayer x layer: ``known_id``, ``subject``, ``variant``, ``sublayer``
    (``attn`` / ``mlp``), ``layer``, ``top1_id`` (of the sublayer output at the last position),
    ``attribute_id``, ``attribute_rank`` (0 = top-1), ``attribute_logprob`` and ``event`` (top-1 is the
    attribute). See the module docstring for the variants; ``patch_layer`` is the block whose subject
    representations ``"patch_subject"`` keeps."""
    from fflayers.hooks import capture

    for v in variants:
        if v not in EXTRACTION_VARIANTS:
            raise InputError(f"unknown extraction variant {v!r}; "
                             f"choose from {', '.join(EXTRACTION_VARIANTS)}")
    patch_layer = adapter.check_layer(patch_layer)
    L = adapter.n_layers
    rows: list[tuple[int, dict]] = []  # (fact index, row): rows come out fact by fact
    for offset, batch in numbered_batches(adapter, encoded, batch_size):
        B = len(batch)
        targets = torch.tensor([item.attribute_id for item in batch.items], device=adapter.device)
        for variant in variants:
            with capture(adapter, list(SUBLAYERS.values())) as cache, \
                    _variant_context(adapter, batch, variant, patch_layer):
                adapter.run(batch.ids, batch.mask)
            vectors = torch.stack([gather_rows(cache[point, layer], batch.last)
                                   for point in SUBLAYERS.values() for layer in range(L)])  # [2L, B, d]
            top, rank, lp = target_ranks(adapter, vectors.reshape(-1, vectors.shape[-1]),
                                         targets.repeat(2 * L), final_norm)
            top, rank, lp = (t.reshape(2, L, B).cpu() for t in (top, rank, lp))
            for si, sublayer in enumerate(SUBLAYERS):
                for layer in range(L):
                    for b, item in enumerate(batch.items):
                        rows.append((offset + b, {"known_id": item.fact.known_id,
                                     "subject": item.fact.subject, "variant": variant, "sublayer": sublayer,
                                     "layer": layer, "top1_id": int(top[si, layer, b]),
                                     "attribute_id": item.attribute_id,
                                     "attribute_rank": int(rank[si, layer, b]),
                                     "attribute_logprob": float(lp[si, layer, b]),
                                     "event": bool(rank[si, layer, b] == 0)}))
    return pd.DataFrame(rows_by_fact(rows),
                        columns=["known_id", "subject", "variant", "sublayer", "layer", "top1_id",
                                 "attribute_id", "attribute_rank", "attribute_logprob", "event"])


def extraction_rates(events: pd.DataFrame, top_k: int = 10) -> pd.DataFrame:
    """Per variant x sublayer x layer: ``n_facts``, ``events`` and ``rate`` (share of facts with an event),
    and ``topk_rate``: the share of facts whose attribute is within the ``top_k`` tokens of the projected
    sublayer output (rank < ``top_k``; what is left to see when no top-1 event occurs)."""
    if top_k < 1:
        raise InputError(f"top_k {top_k} must be >= 1")
    table = events.assign(in_top_k=events["attribute_rank"] < top_k)
    g = table.groupby(["variant", "sublayer", "layer"], sort=False)
    out = g.agg(n_facts=("event", "size"), events=("event", "sum"), topk=("in_top_k", "sum")).reset_index()
    out["rate"] = out["events"] / out["n_facts"]
    out["topk_rate"] = out.pop("topk") / out["n_facts"]
    return out


def extraction_overview(events: pd.DataFrame, top_k: int = 10) -> pd.DataFrame:
    """Per variant: ``n_facts``; per sublayer the number of events (``attn_events``, ``mlp_events``) and the
    share of facts with at least one (``attn_any``, ``mlp_any``), and the share of facts whose attribute is
    within the sublayer's ``top_k`` tokens in some layer (``attn_topk_any``, ``mlp_topk_any``); which
    sublayer fires first, as shares of facts: ``first_attn``, ``first_mlp``, ``first_same_layer`` (both in
    the same earliest layer), ``first_none`` (no event at all)."""
    if top_k < 1:
        raise InputError(f"top_k {top_k} must be >= 1")
    rows = []
    for variant, part in events.groupby("variant", sort=False):
        hits = part[part["event"]]
        first = hits.groupby(["known_id", "sublayer"])["layer"].min().unstack()
        first = first.reindex(columns=list(SUBLAYERS))
        n = part["known_id"].nunique()
        attn, mlp = first["attn"], first["mlp"]
        row = {"variant": variant, "n_facts": n}
        for s in SUBLAYERS:
            row[f"{s}_events"] = int((hits["sublayer"] == s).sum())
            row[f"{s}_any"] = hits.loc[hits["sublayer"] == s, "known_id"].nunique() / n if n else float("nan")
            near = part[(part["sublayer"] == s) & (part["attribute_rank"] < top_k)]
            row[f"{s}_topk_any"] = near["known_id"].nunique() / n if n else float("nan")
        first_attn = int((attn.notna() & (mlp.isna() | (attn < mlp))).sum())
        first_mlp = int((mlp.notna() & (attn.isna() | (mlp < attn))).sum())
        same = int((attn.notna() & mlp.notna() & (attn == mlp)).sum())
        row.update(first_attn=first_attn / n, first_mlp=first_mlp / n, first_same_layer=same / n,
                   first_none=(n - first_attn - first_mlp - same) / n)
        rows.append(row)
    return pd.DataFrame(rows)
