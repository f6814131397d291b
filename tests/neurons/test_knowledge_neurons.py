"""KnowledgeNeurons: coarse/refined selection wiring (planted scores), argument checks, delegation,
SmolLM2."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.neurons import KnowledgeNeurons
from tests.fixtures.hf_models import tiny_model
from tests.neurons.helpers import hf_log_probs


@pytest.fixture
def kn() -> KnowledgeNeurons:
    return KnowledgeNeurons(HFAdapter(tiny_model("gpt2"), device="cpu"))


def _plant(kn, monkeypatch, table: dict[tuple, list[tuple[int, int]]]):
    """get_scores returns 1.0 at the planted neurons of each prompt (keyed by its token ids), 0 elsewhere."""
    calls = []

    def fake(prompt, ground_truth, batch_size=10, steps=20, quiet=True, layers=None):
        calls.append((tuple(prompt), tuple(ground_truth), batch_size, steps))
        s = torch.zeros(kn.adapter.n_layers, kn.adapter.d_ff)
        for layer, i in table[tuple(prompt)]:
            s[layer, i] = 1.0
        return s

    monkeypatch.setattr(kn, "get_scores", fake)
    return calls


def test_refined_neurons_share_and_really_remove_negatives(kn, monkeypatch):
    table = {
        (1, 2): [(0, 5), (1, 7), (2, 9)],
        (3, 4): [(0, 5), (1, 7)],
        (5, 6): [(0, 5), (2, 9)],
        (7, 8): [(1, 7), (2, 1)],  # a negative example: another fact, same phrasing
    }
    calls = _plant(kn, monkeypatch, table)
    prompts = [[1, 2], [3, 4], [5, 6]]
    assert kn.get_refined_neurons(prompts, [9], p=0.5, batch_size=4, steps=3,
                                  quiet=True) == [[0, 5], [1, 7], [2, 9]]
    got = kn.get_refined_neurons(prompts, [9], negative_examples=[[7, 8]], p=0.5, quiet=True)
    assert got == [[0, 5], [2, 9]]
    assert calls[0] == ((1, 2), (9,), 4, 3)
    # a (prompt, ground truth) pair as negative example
    kn.get_refined_neurons(prompts, [9], negative_examples=[([7, 8], [11])], quiet=True)
    assert calls[-1][:2] == ((7, 8), (11,))
    assert kn.get_refined_neurons(prompts, [9], p=0.7, quiet=True) == [[0, 5]]


def test_coarse_neurons_use_one_threshold(kn, monkeypatch):
    _plant(kn, monkeypatch, {(1, 2): [(0, 5), (2, 9)]})
    assert kn.get_coarse_neurons([1, 2], [9], adaptive_threshold=0.5) == [[0, 5], [2, 9]]
    assert kn.get_coarse_neurons([1, 2], [9], threshold=1.0) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"coarse_threshold": 0.1}, "exactly one"),  # with the default coarse_adaptive_threshold=0.3
    ({"coarse_adaptive_threshold": None}, "exactly one"),
    ({"coarse_adaptive_threshold": 1.2}, "out of range"),
    ({"coarse_adaptive_threshold": None, "coarse_percentile": -1}, "out of range"),
    ({"p": 1.0}, "p=1.0 is out of range"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"negative_examples": "[7, 8]"}, "negative_examples must be a list"),
])
def test_refined_bad_arguments_fail_before_work(kn, monkeypatch, kwargs, message):
    calls = _plant(kn, monkeypatch, {})
    with pytest.raises(FflayersError, match=message):
        kn.get_refined_neurons([[1, 2]], [9], quiet=True, **kwargs)
    assert calls == []


def test_bad_prompt_in_refined_fails_before_work(kn, monkeypatch):
    calls = _plant(kn, monkeypatch, {(1, 2): []})
    with pytest.raises(FflayersError, match="outside the vocabulary"):
        kn.get_refined_neurons([[1, 2], [1, 999]], [9], quiet=True)
    with pytest.raises(FflayersError, match="non-empty list"):
        kn.get_refined_neurons("one prompt", "x", quiet=True)
    assert calls == []


def test_scores_bad_arguments(kn):
    with pytest.raises(FflayersError, match="unknown convention"):
        KnowledgeNeurons(kn.adapter, convention="other")
    with pytest.raises(FflayersError, match="steps"):
        kn.get_scores([1, 2], [3], steps=0)
    with pytest.raises(FflayersError, match="batch_size"):
        kn.get_scores([1, 2], [3], batch_size=-1)
    with pytest.raises(FflayersError, match="exactly one"):
        kn.get_coarse_neurons([1, 2], [3], threshold=0.1, percentile=5)


@pytest.mark.parametrize("method",
                         ["suppress_knowledge", "enhance_knowledge", "erase_knowledge", "edit_knowledge"])
def test_modifications_delegate_with_the_adapter(kn, monkeypatch, method):
    from fflayers.neurons import modify

    seen = {}
    monkeypatch.setattr(modify, method,
                        lambda adapter, *a, **k: seen.update(adapter=adapter, args=a, kwargs=k) or "ok")
    assert getattr(kn, method)("prompt", "answer", [[0, 1]], undo_modification=False) == "ok"
    assert seen == {"adapter": kn.adapter, "args": ("prompt", "answer", [[0, 1]]),
                    "kwargs": {"undo_modification": False}}


@pytest.mark.real_model
def test_smollm2_scores_match_autograd(smollm2):
    """steps=1 (alpha = 1): Attr = a * dP/da at the last prompt position, checked with the model's own
    logits."""
    kn = KnowledgeNeurons(smollm2)
    layer = 29
    scores = kn.get_scores("The capital of France is", "Paris", steps=1, layers=[layer])
    assert scores.shape == (30, 1536) and torch.isfinite(scores).all()
    assert (scores[:layer] == 0).all()
    model, tok = smollm2.model, smollm2.tokenizer
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    paris = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert len(paris) == 1
    pos, leaf = ids.shape[1] - 1, {}

    def make_leaf(module, args):  # the coefficient at pos becomes a leaf tensor with its own value
        x = args[0].clone()
        leaf["a"] = x[0, pos].detach().requires_grad_(True)
        x[0, pos] = leaf["a"]
        return (x, *args[1:])

    handle = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(make_leaf)
    try:
        p = hf_log_probs(model)(ids)[0, pos, paris[0]].exp()
    finally:
        handle.remove()
    a = leaf["a"]
    want = a.detach() * torch.autograd.grad(p, a)[0]
    torch.testing.assert_close(scores[layer], want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
