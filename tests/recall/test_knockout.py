"""Attention knockout against an independent recomputation: the models' own (eager) attention with an explicit
additive mask handed to the attention modules of the window's layers by plain torch pre-hooks, one fact at a
time; plus empty sets, padding, windows and fully blocked rows."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.hooks import block_attention, capture
from fflayers.recall import KNOCKOUT_SETS, EncodedFact, KnownFact, attention_knockout, knockout_position_sets
from tests.fixtures.hf_models import VOCAB, tiny_model

CAUSAL_ARCHS = ["gpt2", "gpt_neo", "gptj", "gpt_neox", "llama"]
FAIRSEQ = ["fairseq_plain_lm", "fairseq_adaptive_lm"]

#: module receiving ``attention_mask`` in block i, per architecture (transformers' own paths)
ATTN_PATH = {"gpt2": "transformer.h.{}.attn", "gpt_neo": "transformer.h.{}.attn.attention",
             "gptj": "transformer.h.{}.attn", "gpt_neox": "gpt_neox.layers.{}.attention",
             "llama": "model.layers.{}.self_attn"}


def make_facts(vocab: int, first: int | None = None) -> list[EncodedFact]:
    """Facts of lengths 4, 6, 9 and 2 with the subject at the start, middle and end (written by hand);
    ``first`` is a fixed first token (fairseq's ``</s>``)."""
    g = torch.Generator().manual_seed(11)
    shapes = [(4, [0, 1]), (6, [2, 3]), (9, [5, 6, 7, 8]), (2, [0])]
    facts = []
    for i, (n, subject) in enumerate(shapes):
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        if first is not None:
            ids[0] = first
            subject = [p for p in subject if p > 0] or [1]
        facts.append(EncodedFact(KnownFact(i, f"s{i}", f"a{i}", f"p{i}"), ids, subject, [ids[-1]]))
    return facts


def test_position_sets_by_hand():
    item = EncodedFact(KnownFact(0, "s", "a", "p"), [9, 8, 7, 6, 5, 4], [2, 3], [1])
    assert knockout_position_sets(item) == {"subject": [2, 3], "non_subject": [0, 1, 4], "last": [5],
                                            "first": [0], "non_subject_excl_first": [1, 4]}
    at_end = EncodedFact(KnownFact(0, "s", "a", "p"), [9, 8, 7], [1, 2], [1])
    assert knockout_position_sets(at_end)["subject"] == [1, 2]
    assert knockout_position_sets(at_end)["non_subject"] == [0]


# ----- the independent reference ----------------------------------------------------------------------------


def additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


@contextmanager
def masks_in(modules: list[torch.nn.Module], key: str, mask: torch.Tensor):
    """Replace the keyword argument ``key`` (the attention mask) of each module's forward by ``mask``."""

    def pre_hook(_module, args, kwargs):
        assert key in kwargs, f"the attention module got no {key} keyword"
        return args, {**kwargs, key: mask}

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def reference_hf(model, arch: str, item: EncodedFact, positions: list[int], lo: int, hi: int,
                 target: int | None):
    """Probability of ``target`` (None: the top-1) at the last position, with the model's eager attention
    reading an explicit mask in layers lo..hi where the last query may not read ``positions``."""
    T = len(item.ids)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    allowed[T - 1, positions] = False
    modules = [model.get_submodule(ATTN_PATH[arch].format(layer)) for layer in range(lo, hi + 1)]
    with torch.no_grad(), masks_in(modules, "attention_mask", additive(allowed)[None, None]):
        probs = torch.softmax(model(input_ids=torch.tensor([item.ids])).logits[0, -1].double(), -1)
    target = int(probs.argmax()) if target is None else target
    return target, float(probs[target])


def eager_copy(model):
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"
    return ref


def check_against_reference(table, facts, reference) -> None:
    moved = 0
    for item in facts:
        target, p = reference(item, [], 0, 0, None)
        positions = knockout_position_sets(item)
        rows = table[table["known_id"] == item.fact.known_id]
        for row in rows.itertuples(index=False):
            _, expected = reference(item, positions[row.set], row.window_start, row.window_end, target)
            assert row.p == pytest.approx(p, rel=1e-4, abs=1e-7)
            assert row.p_new == pytest.approx(expected, rel=1e-4, abs=1e-7), (
                item.fact.known_id, row.set, row.layer)
            assert row.rel_change_pct == pytest.approx(100 * (row.p_new - row.p) / row.p, rel=1e-9, abs=1e-9)
            moved += abs(expected - p) > 1e-4 * p
    assert moved > len(table) // 3  # the blocking changes something


@pytest.mark.parametrize("arch, window", [(arch, 1) for arch in CAUSAL_ARCHS] + [("gpt2", 3)])
def test_hf_knockout_equals_explicit_mask_recomputation(arch, window):
    model = tiny_model(arch)
    reference_model = eager_copy(model)
    adapter = HFAdapter(model, device="cpu")
    facts = make_facts(VOCAB)
    table = attention_knockout(adapter, facts, sets=KNOCKOUT_SETS, window=window, batch_size=16)
    assert len(table) == len(facts) * adapter.n_layers * len(KNOCKOUT_SETS)
    check_against_reference(table, facts, lambda *a: reference_hf(reference_model, arch, *a))


@pytest.mark.parametrize("arch", [*CAUSAL_ARCHS, "gemma2"])
def test_prefix_cache_equals_whole_prompts_row_by_row(arch, monkeypatch):
    """Gemma 2: soft-capped scores, and sliding layers whose cache keeps the last 4 keys of a 9-token fact."""
    if arch == "gemma2":
        from tests.backends.conftest import hf_model

        adapter = HFAdapter(hf_model(arch), device="cpu")
    else:
        adapter = HFAdapter(tiny_model(arch), device="cpu")
    facts = make_facts(VOCAB)
    whole = attention_knockout(adapter, facts, sets=KNOCKOUT_SETS, window=3, batch_size=7, prefix_cache=False)
    calls = {"cached": 0, "tokens": 0}
    run_cached = adapter.run_cached

    def counting(cache, ids):
        calls["cached"] += 1
        calls["tokens"] += ids.numel()
        return run_cached(cache, ids)

    monkeypatch.setattr(adapter, "run_cached", counting)
    cached = attention_knockout(adapter, facts, sets=KNOCKOUT_SETS, window=3, batch_size=7)
    # every row of a fact with a prefix runs one token: rows with something to block, over facts longer than 1
    n_rows = sum(1 for item in facts for layer in range(adapter.n_layers) for name in KNOCKOUT_SETS
                 if knockout_position_sets(item)[name])
    assert calls["tokens"] == n_rows
    keys = ["known_id", "set", "layer", "window_start", "window_end"]
    assert cached[keys].equals(whole[keys])
    for col in ("p", "p_new"):
        torch.testing.assert_close(torch.tensor(cached[col].values), torch.tensor(whole[col].values),
                                   rtol=1e-5, atol=1e-8)
    # a difference of near-equal probabilities: compared in percentage points
    torch.testing.assert_close(torch.tensor(cached["rel_change_pct"].values),
                               torch.tensor(whole["rel_change_pct"].values), rtol=0, atol=1e-3)


def reference_fairseq(model, item: EncodedFact, positions: list[int], lo: int, hi: int, target: int | None):
    """The same with fairseq's own MultiheadAttention reading an explicit additive ``attn_mask``."""
    T = len(item.ids)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    allowed[T - 1, positions] = False
    mask = torch.where(allowed, 0.0, float("-inf"))
    modules = [model.decoder.layers[layer].self_attn for layer in range(lo, hi + 1)]
    with torch.no_grad(), masks_in(modules, "attn_mask", mask):
        out = model(torch.tensor([item.ids]))
        probs = model.get_normalized_probs(out, log_probs=False)[0, -1].double()
    target = int(probs.argmax()) if target is None else target
    return target, float(probs[target])


@pytest.mark.parametrize("name", FAIRSEQ)
def test_fairseq_knockout_equals_explicit_mask_recomputation(name, fairseq_adapters):
    adapter = fairseq_adapters(name)
    facts = make_facts(adapter.vocab_size, first=adapter.vocab.bos_id)
    table = attention_knockout(adapter, facts, sets=KNOCKOUT_SETS, window=1, batch_size=16)
    check_against_reference(table, facts, lambda *a: reference_fairseq(adapter.model, *a))


# ----- batching, empty sets, windows ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "fairseq_plain_lm"])
def test_batched_with_padding_equals_one_by_one(arch, fairseq_adapters):
    if arch.startswith("fairseq"):
        adapter = fairseq_adapters(arch)
        facts = make_facts(adapter.vocab_size, first=adapter.vocab.bos_id)
    else:
        adapter = HFAdapter(tiny_model(arch), device="cpu")
        facts = make_facts(VOCAB)
    together = attention_knockout(adapter, facts, sets=KNOCKOUT_SETS, window=3, batch_size=37)
    alone = [attention_knockout(adapter, [f], sets=KNOCKOUT_SETS, window=3, batch_size=1) for f in facts]
    import pandas as pd

    alone = pd.concat(alone, ignore_index=True)
    assert together[["known_id", "set", "layer", "window_start", "window_end"]].equals(
        alone[["known_id", "set", "layer", "window_start", "window_end"]])
    for col in ("p", "p_new"):
        torch.testing.assert_close(torch.tensor(together[col].values), torch.tensor(alone[col].values),
                                   rtol=1e-5, atol=1e-8)


def test_empty_set_equals_the_unmodified_model_exactly():
    model = tiny_model("gpt2")
    adapter = HFAdapter(model, device="cpu")
    facts = make_facts(VOCAB)  # fact 3 ("s3", 2 tokens, subject = position 0): non_subject sets are empty
    table = attention_knockout(adapter, facts, sets=KNOCKOUT_SETS, window=3, batch_size=50)
    empty = table[(table["known_id"] == 3) & table["set"].isin(["non_subject", "non_subject_excl_first"])]
    assert len(empty) == 2 * adapter.n_layers
    assert (empty["p_new"] == empty["p"]).all() and (empty["rel_change_pct"] == 0.0).all()
    with torch.no_grad():
        plain = torch.softmax(model(input_ids=torch.tensor([facts[3].ids])).logits[0, -1].double(), -1).max()
    assert empty["p"].iloc[0] == pytest.approx(float(plain), rel=1e-6)
    # the same batch knocked out non-empty sets of the other facts
    assert (table[table["known_id"] != 3]["rel_change_pct"].abs() > 1e-3).any()


def test_windows_are_clipped_to_the_model():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")  # 3 layers
    table = attention_knockout(adapter, make_facts(VOCAB)[:1], sets=["last"], window=3)
    assert table[["layer", "window_start", "window_end"]].values.tolist() == [[0, 0, 1], [1, 0, 2], [2, 1, 2]]
    table = attention_knockout(adapter, make_facts(VOCAB)[:1], sets=["last"], window=9, layers=[1])
    assert table[["layer", "window_start", "window_end"]].values.tolist() == [[1, 0, 2]]


def test_bad_options_are_one_line_errors():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    facts = make_facts(VOCAB)
    with pytest.raises(FflayersError, match="unknown knockout set 'object'"):
        attention_knockout(adapter, facts, sets=["object"])
    with pytest.raises(FflayersError, match="layer 5 is out of range"):
        attention_knockout(adapter, facts, layers=[5])
    with pytest.raises(FflayersError, match="masked LM"):
        attention_knockout(HFAdapter(tiny_model("bert"), device="cpu"), facts)


# ----- fully blocked rows -----------------------------------------------------------------------------------


def out_bias(adapter, layer: int) -> torch.Tensor:
    module = adapter.hook_site("attn_out", layer).module
    proj = [m for m in module.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"][-1]
    return proj.bias.detach() if proj.bias is not None else torch.zeros(adapter.d_model)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "fairseq_plain_lm"])
def test_fully_blocked_row_gives_zero_attention_output(arch, fairseq_adapters):
    """Per-row [B, T, S] masks: row 0's last query reads nothing (output = the projection's bias alone), row 1
    is untouched."""
    adapter = (fairseq_adapters(arch) if arch.startswith("fairseq")
               else HFAdapter(tiny_model(arch), device="cpu"))
    ids = torch.randint(4, min(VOCAB, adapter.vocab_size), (2, 6), generator=torch.Generator().manual_seed(1))
    blocked = torch.zeros(2, 6, 6, dtype=torch.bool)
    blocked[0, 5, :] = True
    layer = 1
    with torch.no_grad(), capture(adapter, ["attn_out"], layers=[layer]) as plain:
        adapter.run(ids)
    with torch.no_grad(), block_attention(adapter, {layer: blocked}), capture(adapter, ["attn_out"],
                                                                              layers=[layer]) as c:
        adapter.run(ids)
    got = c["attn_out", layer]
    torch.testing.assert_close(got[0, 5] - out_bias(adapter, layer), torch.zeros(adapter.d_model),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(got[0, :5], plain["attn_out", layer][0, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], plain["attn_out", layer][1], atol=1e-5, rtol=1e-5)
    assert (plain["attn_out", layer][0, 5] - out_bias(adapter, layer)).abs().max() > 1e-3
