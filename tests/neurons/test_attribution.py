"""Integrated gradients vs an independent Riemann-sum loop (plain hooks, the models' own logits), on every
architecture and both conventions; completeness; batch-size invariance."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.neurons import KnowledgeNeurons, alpha_grid, attributed_point
from tests.fixtures.hf_models import HF_ARCHS, tiny_model
from tests.neurons.helpers import (
    PatchAt,
    bert_tokenizer,
    fairseq_log_probs,
    ffn_module,
    hf_log_probs,
    package_alphas,
    paper_alphas,
    reference_ig,
)

STEPS = 4
CAUSAL = [a for a in HF_ARCHS if a != "bert"]
PROMPT, ANSWER = [5, 6, 7, 8], [9, 10]  # two-token answer: teacher-forced
FAIRSEQ_LMS = ["fairseq_plain_lm", "fairseq_adaptive_lm", "fairseq_prenorm_lm"]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert want.abs().max() > 0
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def _expected_point(convention: str, masked: bool) -> str:
    return "mlp_coef" if convention == "paper" or masked else "mlp_key"


def _alphas(convention: str, m: int) -> list[float]:
    return paper_alphas(m) if convention == "paper" else package_alphas(m)


@pytest.mark.parametrize("convention", ["paper", "kn-package"])
@pytest.mark.parametrize("arch", CAUSAL)
def test_causal_matches_riemann_loop(arch, convention):
    model = tiny_model(arch)
    adapter = HFAdapter(model, device="cpu")
    got = KnowledgeNeurons(adapter, convention=convention).get_scores(PROMPT, ANSWER, batch_size=5,
                                                                      steps=STEPS)
    ids = torch.tensor([PROMPT + ANSWER[:-1]])
    positions = [len(PROMPT) - 1, len(PROMPT)]
    want = reference_ig(model, arch, hf_log_probs(model), ids, positions, ANSWER,
                        _expected_point(convention, False), _alphas(convention, STEPS))
    assert got.shape == (adapter.n_layers, adapter.d_ff)
    assert not got.requires_grad
    _close(got, want)


@pytest.mark.parametrize("convention", ["paper", "kn-package"])
@pytest.mark.parametrize("answer, pieces", [("paris", ["paris"]), ("london", ["lon", "##don"])])
def test_bert_matches_riemann_loop(tmp_path, convention, answer, pieces):
    model = tiny_model("bert")
    tok = bert_tokenizer(tmp_path / "tok")
    adapter = HFAdapter(model, tok, device="cpu")
    got = KnowledgeNeurons(adapter, convention=convention).get_scores(
        "the capital of france is [MASK] .", answer, batch_size=7, steps=STEPS)
    masks = " ".join(["[MASK]"] * len(pieces))
    ids = torch.tensor([tok(f"the capital of france is {masks} .")["input_ids"]])
    positions = [i for i, t in enumerate(ids[0].tolist()) if t == tok.mask_token_id]
    want = reference_ig(model, "bert", hf_log_probs(model), ids, positions, tok.convert_tokens_to_ids(pieces),
                        "mlp_coef", _alphas(convention, STEPS))
    _close(got, want)


@pytest.mark.parametrize("convention", ["paper", "kn-package"])
@pytest.mark.parametrize("name", FAIRSEQ_LMS)
def test_fairseq_matches_riemann_loop(fairseq_adapters, name, convention):
    adapter = fairseq_adapters(name)
    got = KnowledgeNeurons(adapter, convention=convention).get_scores(
        "Paris is the capital of the", "old city", batch_size=6, steps=STEPS)
    d = adapter.dictionary
    words = "Paris is the capital of the old".split()
    ids = torch.tensor([[d.eos()] + [d.index(w) for w in words]])
    assert d.unk() not in ids[0].tolist()
    n = len(words) - 1  # prompt words; the answer's first word is predicted after the last of them
    want = reference_ig(adapter.model, "fairseq", fairseq_log_probs(adapter.model), ids, [n, n + 1],
                        [d.index("old"), d.index("city")], _expected_point(convention, False),
                        _alphas(convention, STEPS), time_first=True)
    _close(got, want)


def test_conventions_pick_point_and_grid():
    causal = HFAdapter(tiny_model("gpt2"), device="cpu")
    masked = HFAdapter(tiny_model("bert"), device="cpu")
    assert attributed_point(causal, "paper") == "mlp_coef"
    assert attributed_point(causal, "kn-package") == "mlp_key"
    assert attributed_point(masked, "kn-package") == "mlp_coef"
    assert alpha_grid(4, "paper").tolist() == [0.25, 0.5, 0.75, 1.0]
    assert alpha_grid(5, "kn-package").tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_completeness_one_layer(arch):
    """Sum of a layer's attributions -> P(target | a) - P(target | activation 0 at that layer) as steps
    grow."""
    model = tiny_model(arch, seed=3)
    adapter = HFAdapter(model, device="cpu")
    kn = KnowledgeNeurons(adapter)
    ids = torch.tensor([PROMPT])
    pos, layer = len(PROMPT) - 1, 1
    lp = hf_log_probs(model)
    module = ffn_module(model, arch, layer, "mlp_coef")
    with torch.no_grad():
        module.weight.mul_(30.0)  # a layer that matters
        p_full = lp(ids)[0, pos].exp()
        with PatchAt(module, "mlp_coef", pos, False, value=torch.zeros(adapter.d_ff)):
            p_zero = lp(ids)[0, pos].exp()
    tok = int((p_full - p_zero).abs().argmax())  # the token this layer moves most
    gap = float(p_full[tok] - p_zero[tok])
    errors = []
    for steps in (4, 64):
        total = float(kn.get_scores(PROMPT, [tok], batch_size=200, steps=steps)[layer].sum())
        errors.append(abs(total - gap))
    assert abs(gap) > 1e-3
    assert errors[1] < errors[0] / 4
    assert errors[1] < 0.02 * abs(gap)


@pytest.mark.parametrize("arch", ["gpt_neox", "bert"])
def test_batch_size_does_not_change_scores(tmp_path, arch):
    model = tiny_model(arch)
    if arch == "bert":
        adapter = HFAdapter(model, bert_tokenizer(tmp_path / "tok"), device="cpu")
        prompt, answer = "[MASK] is the capital of france .", "london"
    else:
        adapter = HFAdapter(model, device="cpu")
        prompt, answer = PROMPT, ANSWER
    kn = KnowledgeNeurons(adapter)
    scores = [kn.get_scores(prompt, answer, batch_size=b, steps=5) for b in (1, 3, 7, 1000)]
    for s in scores[1:]:
        torch.testing.assert_close(s, scores[0], rtol=1e-5, atol=1e-9)


def test_baseline_is_configurable():
    """With baseline b: (a - b) * mean grad at b + alpha (a - b); the loop is rebuilt here for one layer."""
    model = tiny_model("gpt2")
    adapter = HFAdapter(model, device="cpu")
    b = 0.1 * torch.randn(adapter.d_ff, generator=torch.Generator().manual_seed(1))
    got = KnowledgeNeurons(adapter, baseline=b).get_scores(PROMPT, ANSWER[:1], steps=3)
    layer, pos, tok = 2, len(PROMPT) - 1, ANSWER[0]
    module = ffn_module(model, "gpt2", layer, "mlp_coef")
    ids = torch.tensor([PROMPT])
    lp = hf_log_probs(model)
    with torch.no_grad(), PatchAt(module, "mlp_coef", pos, False) as reader:
        lp(ids)
    a, total = reader.seen, 0
    for alpha in paper_alphas(3):
        x = (b + alpha * (a - b)).requires_grad_(True)
        with PatchAt(module, "mlp_coef", pos, False, value=x):
            total = total + torch.autograd.grad(lp(ids)[0, pos, tok].exp(), x)[0]
    _close(got[layer], (a - b) * total / 3)
