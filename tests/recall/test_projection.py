"""Vocabulary projections against the models' own outputs and an independent ``h @ W_U^T``."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.recall.facts import EncodedFact, KnownFact
from fflayers.recall.projection import position_index, vocabulary_projections
from tests.fixtures.hf_models import tiny_model


def planted_facts(lengths=(6, 9, 4), seed=0) -> list[EncodedFact]:
    """Encoded facts of random token ids (no tokenizer needed); the subject covers tokens 1..2."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, 97, (n,), generator=g).tolist()
        fact = KnownFact(i, f"s{i}", f"a{i}", f"prompt {i}")
        out.append(EncodedFact(fact, ids, [1, 2], [int(torch.randint(1, 97, (1,), generator=g))]))
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_last_layer_with_final_norm_equals_the_models_log_probs(arch):
    model = tiny_model(arch)
    adapter = HFAdapter(model, device="cpu")
    facts = planted_facts()
    table = vocabulary_projections(adapter, facts, points=["resid_post"], layers=[-1], positions=["last"],
                                   k=5, batch_size=2, with_tokens=False)
    assert len(table) == 3 * 5
    for item in facts:
        with torch.no_grad():
            logits = model(torch.tensor([item.ids])).logits[0, -1]
        expected = torch.log_softmax(logits.float(), -1).topk(5)
        rows = table[table.known_id == item.fact.known_id].sort_values("rank")
        assert rows["token_id"].tolist() == expected.indices.tolist()
        assert rows["logprob"].tolist() == pytest.approx(expected.values.tolist(), abs=1e-5)
        assert (rows["token_position"] == len(item.ids) - 1).all() and (rows["layer"] == 2).all()


def test_sublayer_output_without_final_norm_equals_h_times_unembedding():
    model = tiny_model("gpt2")
    adapter = HFAdapter(model, device="cpu")
    facts = planted_facts()
    table = vocabulary_projections(adapter, facts, points=["attn_out", "mlp_out"], layers=[1],
                                   positions=["subject_last", "last", 0], k=4, final_norm=False, batch_size=2,
                                   with_tokens=False)
    W_U = model.lm_head.weight.detach()
    seen = {}
    handles = [model.transformer.h[1].attn.register_forward_hook(
                   lambda m, a, out: seen.__setitem__("attn_out", out[0])),
               model.transformer.h[1].mlp.register_forward_hook(
                   lambda m, a, out: seen.__setitem__("mlp_out", out))]
    for item in facts:
        with torch.no_grad():
            model(torch.tensor([item.ids]))
        for point in ("attn_out", "mlp_out"):
            for pos, t in (("subject_last", 2), ("last", len(item.ids) - 1), ("0", 0)):
                expected = torch.log_softmax(seen[point][0, t] @ W_U.T, -1).topk(4)
                rows = table[(table.known_id == item.fact.known_id) & (table.point == point)
                             & (table.position == pos)].sort_values("rank")
                assert rows["token_id"].tolist() == expected.indices.tolist(), (point, pos)
                assert rows["logprob"].tolist() == pytest.approx(expected.values.tolist(), abs=1e-5)
                assert (rows["token_position"] == t).all()
    for h in handles:
        h.remove()


def test_named_positions_and_bad_input():
    item = EncodedFact(KnownFact(7, "s", "a", "p"), [5, 6, 7, 8, 9], [1, 2], [3])
    assert [position_index(item, p) for p in ("first", "subject_first", "subject_last", "after_subject",
                                              "last", -2, "3")] == [0, 1, 2, 3, 4, 3, 3]
    ends = EncodedFact(KnownFact(8, "s", "a", "p"), [5, 6, 7], [1, 2], [3])
    assert position_index(ends, "after_subject") == 2  # the subject ends the prompt: the last token
    with pytest.raises(FflayersError, match="unknown position 'middle'"):
        position_index(item, "middle")
    with pytest.raises(FflayersError, match="out of range"):
        position_index(item, 5)
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    with pytest.raises(FflayersError, match="cannot project hook point mlp_coef"):
        vocabulary_projections(adapter, [item], points=["mlp_coef"], with_tokens=False)
