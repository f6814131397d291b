"""KnowledgeNeurons: coarse/refined selection wiring (planted scores), argument checks, delegation, parity
with the knowledge-neurons package's interface (signatures, README calls, return shape), SmolLM2."""

from __future__ import annotations

import inspect

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.neurons import KnowledgeNeurons
from tests.fixtures.hf_models import tiny_model
from tests.neurons.helpers import bert_tokenizer, hf_log_probs


@pytest.fixture
def kn() -> KnowledgeNeurons:
    return KnowledgeNeurons(HFAdapter(tiny_model("gpt2"), device="cpu"))


def _plant(kn, monkeypatch, table: dict[tuple, list[tuple[int, int]]]):
    """get_scores returns 1.0 at the planted neurons of each prompt (keyed by its token ids), 0 elsewhere."""
    calls = []

    def fake(prompt, ground_truth, batch_size=10, steps=20, attribution_method="integrated_grads", pbar=True,
             **_fflayers):
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


#: method -> a call with every argument positional, and the keywords the class passes to
#: fflayers.neurons.modify
DELEGATED = {
    "suppress_knowledge": (("prompt", "answer", [[0, 1]], False, True),
                           {"undo_modification": False, "quiet": True, "convention": "paper"}),
    "enhance_knowledge": (("prompt", "answer", [[0, 1]], False, True),
                          {"undo_modification": False, "quiet": True, "convention": "paper"}),
    "erase_knowledge": (("prompt", [[0, 1]], "unk", "answer", False, True),
                        {"erase_value": "unk", "target": "answer", "undo_modification": False,
                         "quiet": True}),
    "edit_knowledge": (("prompt", "answer", [[0, 1]], False, True),
                       {"undo_modification": False, "quiet": True}),
}


@pytest.mark.parametrize("method", DELEGATED)
def test_modifications_delegate_with_the_adapter(kn, monkeypatch, method):
    from fflayers.neurons import modify

    seen = {}
    monkeypatch.setattr(modify, method,
                        lambda adapter, *a, **k: seen.update(adapter=adapter, args=a, kwargs=k) or "ok")
    args, kwargs = DELEGATED[method]
    assert getattr(kn, method)(*args) == "ok"
    n_positional = 2 if method == "erase_knowledge" else 3
    assert seen == {"adapter": kn.adapter, "args": args[:n_positional], "kwargs": kwargs}
    kn_package = KnowledgeNeurons(kn.adapter, convention="kn-package")
    getattr(kn_package, method)(*args)
    if "convention" in kwargs:  # the activation edits follow the class's convention
        assert seen["kwargs"]["convention"] == "kn-package"


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


# ----- parity with the knowledge-neurons package's interface ----------------------------------------------

E = inspect.Parameter.empty
#: the package's methods (EleutherAI knowledge-neurons, knowledge_neurons/knowledge_neurons.py): parameters
#: after ``self`` in order, with their defaults (E: none)
PACKAGE_SIGNATURES = {
    "get_scores": [("prompt", E), ("ground_truth", E), ("batch_size", 10), ("steps", 20),
                   ("attribution_method", "integrated_grads"), ("pbar", True)],
    "get_coarse_neurons": [("prompt", E), ("ground_truth", E), ("batch_size", 10), ("steps", 20),
                           ("threshold", None), ("adaptive_threshold", None), ("percentile", None),
                           ("attribution_method", "integrated_grads"), ("pbar", True)],
    "get_refined_neurons": [("prompts", E), ("ground_truth", E), ("negative_examples", None), ("p", 0.5),
                            ("batch_size", 10), ("steps", 20), ("coarse_adaptive_threshold", 0.3),
                            ("coarse_threshold", None), ("coarse_percentile", None), ("quiet", False)],
    "get_scores_for_layer": [("prompt", E), ("ground_truth", E), ("layer_idx", E), ("batch_size", 10),
                             ("steps", 20), ("encoded_input", None),
                             ("attribution_method", "integrated_grads")],
    "modify_activations": [("prompt", E), ("ground_truth", E), ("neurons", E), ("mode", "suppress"),
                           ("undo_modification", True), ("quiet", False)],
    "suppress_knowledge": [("prompt", E), ("ground_truth", E), ("neurons", E), ("undo_modification", True),
                           ("quiet", False)],
    "enhance_knowledge": [("prompt", E), ("ground_truth", E), ("neurons", E), ("undo_modification", True),
                          ("quiet", False)],
    "modify_weights": [("prompt", E), ("neurons", E), ("target", E), ("mode", "edit"),
                       ("erase_value", "zero"), ("undo_modification", True), ("quiet", False)],
    "edit_knowledge": [("prompt", E), ("target", E), ("neurons", E), ("undo_modification", True),
                       ("quiet", False)],
    "erase_knowledge": [("prompt", E), ("neurons", E), ("erase_value", "zero"), ("target", None),
                        ("undo_modification", True), ("quiet", False)],
    "n_layers": [],
    "intermediate_size": [],
}


@pytest.mark.parametrize("method", PACKAGE_SIGNATURES)
def test_methods_take_the_package_arguments_in_its_order(method):
    """Positional-or-keyword parameters exactly the package's (names, order, defaults); fflayers' extras are
    keyword-only, so a positional call written for the package means the same here."""
    params = list(inspect.signature(getattr(KnowledgeNeurons, method)).parameters.values())[1:]
    ordinary = [(q.name, q.default) for q in params if q.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert ordinary == PACKAGE_SIGNATURES[method]
    assert all(q.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
               for q in params)


TEXTS = [  # the package README's paraphrases, in the words of the test vocabulary
    "the capital of france is [MASK]",
    "[MASK] is the capital of france",
    "the city of [MASK] is the capital of france",
    "the capital city of france is [MASK] .",
    "[MASK] is the city of france",
    "[MASK] , the capital of france",
]
MEASURED = {"gt_prob", "argmax_completion", "argmax_prob"}


def _package_shaped(got, with_gt: bool = True) -> dict:
    """``(results_dict, unpatch_fn)`` as the package returns it; results_dict["before"/"after"] hold the
    package's three measurements."""
    results_dict, unpatch_fn = got
    assert callable(unpatch_fn)
    assert {"before", "after"} <= set(results_dict)
    for when in ("before", "after"):
        m = results_dict[when]
        assert set(m) == MEASURED
        assert isinstance(m["argmax_completion"], str) and 0 < m["argmax_prob"] <= 1
        if with_gt:
            assert isinstance(m["gt_prob"], float) and 0 < m["gt_prob"] <= 1
        else:
            assert m["gt_prob"] is None
    return results_dict


@pytest.mark.parametrize("convention", ["paper", "kn-package"])
def test_package_readme_calls_run_as_written(tmp_path, capsys, convention):
    """The package README's example, call for call with its keywords (``quiet=True`` added where the README
    would print), on a tiny BERT."""
    adapter = HFAdapter(tiny_model("bert"), bert_tokenizer(tmp_path / "tok"), device="cpu")
    params = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    kn = KnowledgeNeurons(adapter, convention=convention)
    text, truth = TEXTS[0], "paris"
    refined_neurons = kn.get_refined_neurons(TEXTS, truth, p=0.5, batch_size=20, steps=20,
                                             coarse_adaptive_threshold=0.3, quiet=True)
    assert refined_neurons and all(isinstance(n, list) and len(n) == 2 for n in refined_neurons)
    assert all(0 <= layer < kn.n_layers() and 0 <= i < kn.intermediate_size() for layer, i in refined_neurons)
    capsys.readouterr()
    suppressed = _package_shaped(kn.suppress_knowledge(text, truth, refined_neurons, quiet=True))
    _package_shaped(kn.suppress_knowledge("[MASK] is the capital of germany", "berlin", refined_neurons,
                                          quiet=True))
    enhanced = _package_shaped(kn.enhance_knowledge(text, truth, refined_neurons, quiet=True))
    assert suppressed["before"] == enhanced["before"]
    assert suppressed["after"]["gt_prob"] != enhanced["after"]["gt_prob"]
    _package_shaped(kn.erase_knowledge(text, refined_neurons, target=truth, erase_value="zero", quiet=True))
    _package_shaped(kn.erase_knowledge(text, refined_neurons, target=truth, erase_value="unk", quiet=True))
    _package_shaped(kn.erase_knowledge(text, refined_neurons, quiet=True), with_gt=False)
    edited = _package_shaped(kn.edit_knowledge(text, target="london", neurons=refined_neurons, quiet=True))
    assert edited["after"]["gt_prob"] != edited["before"]["gt_prob"]
    # the generic entry points of the package
    again = _package_shaped(kn.modify_activations(text, truth, refined_neurons, mode="enhance", quiet=True))
    assert again == enhanced
    erased = _package_shaped(kn.modify_weights(text, refined_neurons, truth, mode="erase", erase_value="zero",
                                               quiet=True))
    assert erased == _package_shaped(kn.erase_knowledge(text, refined_neurons, target=truth, quiet=True))
    assert _package_shaped(kn.modify_weights(text, refined_neurons, "london", quiet=True)) == edited
    assert capsys.readouterr().out == ""
    # every change was undone (undo_modification=True is the default)
    assert all(torch.equal(v, params[k]) for k, v in adapter.model.state_dict().items())


def test_quiet_false_prints_before_and_after(capsys):
    from tests.neurons.test_modify import make  # a tiny GPT-2 with a stub tokenizer (the outputs are decoded)

    kn = KnowledgeNeurons(make("gpt2"))
    results, _ = kn.suppress_knowledge([1, 2, 3], [4], [[0, 1]])  # the package's default: quiet=False
    out = capsys.readouterr().out
    assert out.count("before modification") == 1 and out.count("after modification") == 1
    assert f"{results['after']['gt_prob']:.6g}" in out
    kn.erase_knowledge([1, 2, 3], [[0, 1]])
    assert "ground-truth probability -" in capsys.readouterr().out  # no target: no ground truth
    kn.enhance_knowledge([1, 2, 3], [4], [[0, 1]], quiet=True)
    assert capsys.readouterr().out == ""


def test_pbar_and_quiet_switch_the_progress_bar(kn, monkeypatch):
    from fflayers.neurons import knowledge_neurons

    shown = []

    def fake(adapter, target, point, alphas, batch_size=10, layers=None, baseline=0.0, progress=False):
        shown.append(progress)
        return torch.zeros(len(layers), adapter.d_ff)

    monkeypatch.setattr(knowledge_neurons, "integrated_gradients", fake)
    kn.get_scores([1, 2], [3])
    kn.get_scores([1, 2], [3], pbar=False)
    kn.get_scores([1, 2], [3], quiet=True)
    kn.get_coarse_neurons([1, 2], [3], adaptive_threshold=0.3)
    kn.get_coarse_neurons([1, 2], [3], adaptive_threshold=0.3, pbar=False)
    kn.get_scores_for_layer([1, 2], [3], 1)
    kn.get_refined_neurons([[1, 2], [3, 4]], [5])  # the per-prompt bar only (tqdm), as the package does
    assert shown == [True, False, False, True, False, False, False, False]


def test_max_activations_are_the_activations_at_the_target(kn):
    """attribution_method="max_activations": the attributed point's activations at the predicting positions,
    averaged over the answer's tokens, read with a plain hook on c_proj's input (``mlp_coef``)."""
    model = kn.adapter.model
    prompt, answer = [5, 6, 7, 8], [9, 10]
    got = kn.get_scores(prompt, answer, attribution_method="max_activations", pbar=False)
    seen = {}
    handles = [block.mlp.c_proj.register_forward_pre_hook(
        lambda _m, args, layer=layer: seen.update({layer: args[0][0].detach().clone()}))
        for layer, block in enumerate(model.transformer.h)]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt + answer[:-1]]))
    finally:
        for h in handles:
            h.remove()
    n = len(prompt)
    want = torch.stack([seen[layer][[n - 1, n]].mean(0) for layer in range(kn.n_layers())])
    torch.testing.assert_close(got, want)
    layer_1 = kn.get_scores_for_layer(prompt, answer, 1, attribution_method="max_activations")
    torch.testing.assert_close(layer_1, want[1])
    coarse = kn.get_coarse_neurons(prompt, answer, adaptive_threshold=0.9,
                                   attribution_method="max_activations", pbar=False)
    assert coarse == [[int(a), int(b)] for a, b in torch.nonzero(want > 0.9 * want.max()).tolist()]
    with pytest.raises(FflayersError, match="unknown attribution_method"):
        kn.get_scores(prompt, answer, attribution_method="gradients")


def test_generic_modifications_reject_unknown_modes(kn):
    with pytest.raises(FflayersError, match="mode 'boost'"):
        kn.modify_activations([1, 2], [3], [[0, 1]], mode="boost")
    with pytest.raises(FflayersError, match="mode 'move'"):
        kn.modify_weights([1, 2], [[0, 1]], [3], mode="move")
    with pytest.raises(FflayersError, match="needs a target"):
        kn.modify_weights([1, 2], [[0, 1]], None, mode="edit")
