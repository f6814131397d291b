"""Extraction events against an independent loop over the model's own modules (plain torch hooks, one fact at
a time, ``h @ W_U^T``), planted attributes, and the variants' definitions."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.recall.batching import make_fact_batch
from fflayers.recall.extraction import (
    extraction_events,
    extraction_overview,
    extraction_rates,
    last_position_edge_masks,
)
from fflayers.recall.facts import EncodedFact, KnownFact
from tests.fixtures.hf_models import tiny_model


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def sublayer_top1(model, ids, position_ids=None, block_hooks=None) -> dict[tuple[str, int], int]:
    """Top-1 of ``attn_out`` / ``mlp_out`` @ W_U^T at the last position of one unpadded GPT-2 sequence."""
    seen = {}
    handles = []
    for layer, block in enumerate(model.transformer.h):
        handles.append(block.attn.register_forward_hook(
            lambda m, a, out, layer=layer: seen.__setitem__(("attn", layer), _output(out)[0, -1])))
        handles.append(block.mlp.register_forward_hook(
            lambda m, a, out, layer=layer: seen.__setitem__(("mlp", layer), _output(out)[0, -1])))
    for layer, fn in (block_hooks or {}).items():
        handles.append(model.transformer.h[layer].register_forward_hook(fn))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]), position_ids=None if position_ids is None
                  else torch.tensor([position_ids]))
    finally:
        for h in handles:
            h.remove()
    W_U = model.lm_head.weight.detach()
    return {key: int((h @ W_U.T).argmax()) for key, h in seen.items()}


def make_facts(model, lengths=(5, 8, 6, 7, 4, 9), subject=(1, 2)) -> list[EncodedFact]:
    """Random prompts whose attribute is planted as the top-1 of one sublayer's output at one layer (found
    independently), so that events of both kinds occur."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, 97, (n,), generator=g).tolist()
        top = sublayer_top1(model, ids)
        attribute = top[("attn" if i % 2 == 0 else "mlp", i % 3)]
        out.append(EncodedFact(KnownFact(i, f"s{i}", f"a{i}", f"p{i}"), ids, list(subject), [attribute]))
    return out


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_model("gpt2")
    return model, HFAdapter(model, device="cpu")


def test_events_equal_an_independent_loop(gpt2):
    model, adapter = gpt2
    facts = make_facts(model)
    events = extraction_events(adapter, facts, batch_size=4)  # padded batches of mixed lengths
    assert len(events) == len(facts) * 2 * 3
    expected_events = 0
    for item in facts:
        top = sublayer_top1(model, item.ids)
        for (sublayer, layer), token in top.items():
            row = events[(events.known_id == item.fact.known_id) & (events.sublayer == sublayer)
                         & (events.layer == layer)].iloc[0]
            assert row.top1_id == token
            assert bool(row.event) == (token == item.attribute_id)
            assert (row.attribute_rank == 0) == row.event
            expected_events += token == item.attribute_id
    assert events["event"].sum() == expected_events >= len(facts)
    assert set(events.loc[events.event, "sublayer"]) == {"attn", "mlp"}
    rates = extraction_rates(events)
    n_attn = events[(events.sublayer == "attn") & (events.layer == 0)].event.sum()
    assert rates.query("sublayer == 'attn' and layer == 0").rate.item() == pytest.approx(n_attn / len(facts))


def test_overview_counts_first_events():
    import pandas as pd

    rows = []
    # fact 0: attn at 1, mlp at 2 -> attn first; fact 1: mlp at 0 -> mlp first; fact 2: both at 1;
    # fact 3: none
    hits = {(0, "attn", 1), (0, "mlp", 2), (1, "mlp", 0), (2, "attn", 1), (2, "mlp", 1), (0, "attn", 2)}
    # planted ranks of the non-events: fact 3's attribute is 4th in its MHSA output at layer 2, 12th elsewhere
    for k in range(4):
        for s in ("attn", "mlp"):
            for layer in range(3):
                rank = 0 if (k, s, layer) in hits else 3 if (k, s, layer) == (3, "attn", 2) else 11
                rows.append({"known_id": k, "variant": "none", "sublayer": s, "layer": layer,
                             "event": (k, s, layer) in hits, "attribute_rank": rank})
    events = pd.DataFrame(rows)
    ov = extraction_overview(events).iloc[0]
    assert ov.n_facts == 4 and ov.attn_events == 3 and ov.mlp_events == 3
    assert ov.attn_any == 0.5 and ov.mlp_any == 0.75
    assert (ov.first_attn, ov.first_mlp, ov.first_same_layer, ov.first_none) == (0.25, 0.25, 0.25, 0.25)
    # top 10: the event facts plus fact 3's MHSA; top 12 takes every rank-11 row too
    assert (ov.attn_topk_any, ov.mlp_topk_any) == (0.75, 0.75)
    wide = extraction_overview(events, top_k=12).iloc[0]
    assert (wide.attn_topk_any, wide.mlp_topk_any) == (1.0, 1.0)
    rates = extraction_rates(events, top_k=4).set_index(["sublayer", "layer"])
    assert rates.loc[("attn", 2), "topk_rate"] == 0.5  # fact 0 (event) and fact 3 (rank 3)
    assert rates.loc[("attn", 2), "rate"] == 0.25
    assert rates.loc[("mlp", 1), "topk_rate"] == 0.25
    with pytest.raises(FflayersError, match="top_k 0"):
        extraction_rates(events, top_k=0)


def test_blocking_everything_before_last_equals_a_lone_last_token(gpt2):
    """Subject = every token before the last: blocking the subject leaves the last position reading only
    itself, which is the model run on the last token alone at its own position id; blocking non-subject blocks
    nothing."""
    model, adapter = gpt2
    facts = [EncodedFact(f.fact, f.ids, list(range(len(f.ids) - 1)), f.attribute_ids)
             for f in make_facts(model)]
    events = extraction_events(adapter, facts, variants=["none", "block_subject", "block_non_subject"],
                               batch_size=3)
    for item in facts:
        lone = sublayer_top1(model, [item.ids[-1]], position_ids=[len(item.ids) - 1])
        part = events[events.known_id == item.fact.known_id]
        for (sublayer, layer), token in lone.items():
            row = part[(part.variant == "block_subject") & (part.sublayer == sublayer)
                       & (part.layer == layer)]
            assert row.top1_id.item() == token
    none = events[events.variant == "none"].reset_index(drop=True)
    non_subject = events[events.variant == "block_non_subject"].reset_index(drop=True)
    # the same rows; a blocking batch runs attention with an explicit (all-open) mask, which may move the
    # float32 log-probs by an ulp, never a token, rank or event
    floats = [c for c in none.columns if none[c].dtype.kind == "f"]
    exact = [c for c in none.columns if c not in floats and c != "variant"]
    assert none[exact].equals(non_subject[exact])
    for c in floats:
        assert non_subject[c].tolist() == pytest.approx(none[c].tolist(), rel=1e-5, abs=1e-6), c


def test_patched_subject_equals_plain_hook_recomputation(gpt2):
    model, adapter = gpt2
    facts = make_facts(model)
    events = extraction_events(adapter, facts, variants=["patch_subject"], patch_layer=0, batch_size=4)
    for item in facts:
        frozen = {}

        def keep(m, a, out, frozen=frozen):
            frozen["h"] = _output(out).clone()

        def restore(m, a, out, frozen=frozen, item=item):
            h = _output(out).clone()
            h[:, item.subject_positions] = frozen["h"][:, item.subject_positions]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        top = sublayer_top1(model, item.ids, block_hooks={0: keep, 1: restore, 2: restore})
        part = events[events.known_id == item.fact.known_id]
        for (sublayer, layer), token in top.items():
            assert part[(part.sublayer == sublayer) & (part.layer == layer)].top1_id.item() == token
    # freezing after the last block changes nothing
    last = extraction_events(adapter, facts, variants=["patch_subject", "none"], patch_layer=-1)
    a, b = (last[last.variant == v].drop(columns="variant").reset_index(drop=True)
            for v in ("patch_subject", "none"))
    assert a.equals(b)


def test_edge_masks_and_bad_variant(gpt2):
    _, adapter = gpt2
    items = [EncodedFact(KnownFact(0, "s", "a", "p"), [5, 6, 7, 8], [1, 2], [3]),
             EncodedFact(KnownFact(1, "s", "a", "p"), [5, 6, 7, 8, 9, 10], [2], [3])]
    batch = make_fact_batch(adapter, items)
    sub, non, last = (last_position_edge_masks(batch, w) for w in ("subject", "non_subject", "last"))
    assert sub[0].nonzero().tolist() == [[3, 1], [3, 2]] and sub[1].nonzero().tolist() == [[5, 2]]
    assert (non[0].nonzero().tolist() == [[3, 0]]
            and non[1].nonzero().tolist() == [[5, 0], [5, 1], [5, 3], [5, 4]])
    assert last[0].nonzero().tolist() == [[3, 3]] and last[1].nonzero().tolist() == [[5, 5]]
    with pytest.raises(FflayersError, match="unknown extraction variant 'block_all'"):
        extraction_events(adapter, items, variants=["block_all"])
