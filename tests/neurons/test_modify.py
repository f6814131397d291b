"""Suppress / enhance / erase / edit, checked against recomputations with raw PyTorch hooks and hand-edited
copies of tiny models of every HF architecture; ``convention="kn-package"`` against hooks on GPT-2's
``mlp.c_fc``."""

from __future__ import annotations

import copy

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.neurons import KnowledgeNeurons
from fflayers.neurons.modify import (
    Modification,
    edit_knowledge,
    enhance_knowledge,
    erase_knowledge,
    suppress_knowledge,
)
from tests.fixtures.hf_models import HF_ARCHS, LAYERS, tiny_model

#: the FFN output projection of block {} (its input is the coefficient vector m) and how values are stored
#: in its weight: "rows" = weight[i] is value i (GPT-2 Conv1D), "cols" = weight[:, i] (nn.Linear)
FC_OUT = {
    "gpt2": ("transformer.h.{}.mlp.c_proj", "rows"),
    "gpt_neo": ("transformer.h.{}.mlp.c_proj", "cols"),
    "gptj": ("transformer.h.{}.mlp.fc_out", "cols"),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "cols"),
    "llama": ("model.layers.{}.mlp.down_proj", "cols"),
    "bert": ("bert.encoder.layer.{}.output.dense", "cols"),
}
POSITION_EMBEDDINGS = {"gpt2": "transformer.wpe.weight", "gpt_neo": "transformer.wpe.weight",
                       "bert": "bert.embeddings.position_embeddings.weight"}
MASK, UNK = 4, 1
CAUSAL_PROMPT, MASKED_PROMPT, ANSWER = [5, 17, 23, 9, 30], [2, 17, MASK, 9, 3], [41, 12]


class StubTokenizer:
    """Just enough tokenizer for id prompts: mask and unknown ids, and ``w<id>`` strings."""

    mask_token, mask_token_id, unk_token_id = "[MASK]", MASK, UNK

    def decode(self, ids):
        return " ".join(f"w{int(i)}" for i in ids)


def make(arch: str) -> HFAdapter:
    return HFAdapter(tiny_model(arch), tokenizer=StubTokenizer(), device="cpu")


def prompt_of(arch: str) -> list[int]:
    return MASKED_PROMPT if arch == "bert" else CAUSAL_PROMPT


def expected_input(arch: str, answer: list[int] = ANSWER) -> tuple[list[int], list[int]]:
    """Input ids and the positions predicting ``answer`` (one or two tokens), written out by hand."""
    if arch == "bert":  # the single mask widened to one per answer token
        return ([2, 17, MASK, MASK, 9, 3], [2, 3]) if len(answer) == 2 else (MASKED_PROMPT, [2])
    n = len(CAUSAL_PROMPT)
    return CAUSAL_PROMPT + answer[:-1], list(range(n - 1, n - 1 + len(answer)))


def fc_out(model, arch: str, layer: int) -> torch.nn.Module:
    return model.get_submodule(FC_OUT[arch][0].format(layer))


def run_raw(model, arch: str, ids: list[int],
            edits: dict[int, tuple[list[int], list[int], float]] | None = None):
    """Logits and every layer's FFN coefficients, with raw forward pre-hooks scaling
    ``m[:, positions, idx]``."""
    coefs, handles = {}, []
    for layer in range(LAYERS):
        def hook(_module, args, layer=layer):
            x = args[0]
            if edits and layer in edits:
                positions, idx, factor = edits[layer]
                x = x.clone()
                for p in positions:
                    x[:, p, idx] = x[:, p, idx] * factor
            coefs[layer] = x.detach().clone()
            return (x, *args[1:])

        handles.append(fc_out(model, arch, layer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, coefs


def answer_prob(logits: torch.Tensor, positions: list[int], answer: list[int]) -> float:
    lp = torch.log_softmax(logits.double(), -1)
    return float(sum(lp[p, t] for p, t in zip(positions, answer, strict=True)).exp())


@pytest.mark.parametrize("arch", HF_ARCHS)
@pytest.mark.parametrize("fn,factor", [(suppress_knowledge, 0.0), (enhance_knowledge, 2.0)])
def test_activation_edits_only_at_target_positions(arch, fn, factor):
    adapter = make(arch)
    model = adapter.model
    ids, positions = expected_input(arch)
    neurons = [[1, 3], [1, 10], [2, 7]]
    base_logits, base = run_raw(model, arch, ids)
    with fn(adapter, prompt_of(arch), ANSWER, neurons) as results:
        logits, coefs = run_raw(model, arch, ids)
    want_logits, want = run_raw(model, arch, ids,
                                {1: (positions, [3, 10], factor), 2: (positions, [7], factor)})
    for layer in range(LAYERS):
        torch.testing.assert_close(coefs[layer], want[layer], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    # layer 0 untouched; layer 1: only the chosen neurons at the target positions
    assert torch.equal(coefs[0], base[0])
    diff = (coefs[1] != base[1])[0]
    assert diff.nonzero().tolist() == [[p, i] for p in positions for i in (3, 10)]
    if arch != "bert":  # causal: positions before the answer's first predicting position never change
        first = positions[0]
        torch.testing.assert_close(logits[:first], base_logits[:first], atol=0, rtol=0)
    assert results["before"]["gt_prob"] == pytest.approx(answer_prob(base_logits, positions, ANSWER),
                                                         rel=1e-4)
    assert results["after"]["gt_prob"] == pytest.approx(answer_prob(want_logits, positions, ANSWER), rel=1e-4)
    best = want_logits[positions].argmax(-1).tolist()
    assert results["after"]["argmax_completion"] == StubTokenizer().decode(best)


MODIFIERS = {
    "suppress": lambda a, arch, **kw: suppress_knowledge(a, prompt_of(arch), ANSWER, NEURONS, **kw),
    "enhance": lambda a, arch, **kw: enhance_knowledge(a, prompt_of(arch), ANSWER, NEURONS, **kw),
    "erase_zero": lambda a, arch, **kw: erase_knowledge(a, prompt_of(arch), NEURONS, target=ANSWER, **kw),
    "erase_unk": lambda a, arch, **kw: erase_knowledge(a, prompt_of(arch), NEURONS, "unk",
                                                       target=ANSWER, **kw),
    "edit": lambda a, arch, **kw: edit_knowledge(a, prompt_of(arch), [50], NEURONS, **kw),
}
NEURONS = [[0, 3], [2, 7], [2, 8]]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("kind", MODIFIERS)
def test_undo_and_context_manager_restore_exactly(arch, kind):
    adapter = make(arch)
    model, modify = adapter.model, MODIFIERS[kind]
    ids, _ = expected_input(arch)
    before, params = run_raw(model, arch, ids)[0], snapshot(model)

    def unchanged() -> bool:
        now = snapshot(model)
        return torch.equal(run_raw(model, arch, ids)[0], before) and all(torch.equal(now[k], v)
                                                                         for k, v in params.items())

    results, undo = modify(adapter, arch)  # default: undone right after measuring
    assert unchanged() and results["before"]["gt_prob"] != results["after"]["gt_prob"]
    mod = modify(adapter, arch, undo_modification=False)
    assert isinstance(mod, Modification) and mod.active and not unchanged()
    mod.undo()
    assert unchanged()
    mod.undo()  # a second undo is a no-op
    assert unchanged()
    answer = [50] if kind == "edit" else ANSWER
    with modify(adapter, arch) as res:
        assert not unchanged()
        ids_a, positions = expected_input(arch, answer)
        now = run_raw(model, arch, ids_a)[0]
        assert res["after"]["gt_prob"] == pytest.approx(answer_prob(now, positions, answer), rel=1e-4)
    assert unchanged()
    with pytest.raises(RuntimeError, match="boom"), modify(adapter, arch):
        raise RuntimeError("boom")
    assert unchanged()


def hand_edited(model, arch: str, rows: dict[int, list[int]], new_row) -> torch.nn.Module:
    """Deep copy with value rows replaced by ``new_row(layer, i, old_row)``, written straight into the
    weights."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for layer, idx in rows.items():
            w = fc_out(other, arch, layer).weight
            for i in idx:
                if FC_OUT[arch][1] == "rows":
                    w[i] = new_row(layer, i, w[i].clone())
                else:
                    w[:, i] = new_row(layer, i, w[:, i].clone())
    return other


def assert_same_params(a, b, exact: bool = True) -> None:
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-6, msg=k)


@pytest.mark.parametrize("arch", HF_ARCHS)
@pytest.mark.parametrize("erase_value", ["zero", "unk"])
def test_erase_writes_exactly_the_value_rows(arch, erase_value):
    adapter = make(arch)
    model = adapter.model
    original = copy.deepcopy(model)
    unk_row = model.get_output_embeddings().weight[UNK].detach().clone()
    fill = (lambda *_: torch.zeros_like(unk_row)) if erase_value == "zero" else (lambda *_: unk_row)
    expected = hand_edited(model, arch, {0: [3], 2: [7, 8]}, fill)
    mod = erase_knowledge(adapter, prompt_of(arch), NEURONS, erase_value, target=ANSWER,
                          undo_modification=False)
    assert_same_params(model, expected)
    if arch in POSITION_EMBEDDINGS:
        name = POSITION_EMBEDDINGS[arch]
        assert torch.equal(model.get_parameter(name), original.get_parameter(name))
    ids, positions = expected_input(arch)
    with torch.no_grad():
        after = expected(input_ids=torch.tensor([ids])).logits[0]
    assert mod.results["after"]["gt_prob"] == pytest.approx(answer_prob(after, positions, ANSWER), rel=1e-4)
    mod.undo()
    assert_same_params(model, original)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_edit_shifts_values_from_old_to_new_answer(arch):
    adapter = make(arch)
    model = adapter.model
    ids, positions = expected_input(arch)
    new = 50
    with torch.no_grad():
        old = int(model(input_ids=torch.tensor([ids])).logits[0, positions[0]].argmax())
    E = model.get_output_embeddings().weight.detach().clone()
    expected = hand_edited(model, arch, {0: [3], 2: [7, 8]}, lambda _l, _i, v: v - 2 * E[old] + 2 * E[new])
    mod = edit_knowledge(adapter, prompt_of(arch), [new], NEURONS, undo_modification=False)
    assert_same_params(model, expected, exact=False)
    assert mod.results["old"] == f"w{old}" and mod.results["target"] == [new]
    new_ids, new_positions = expected_input(arch, [new])
    with torch.no_grad():
        after = expected(input_ids=torch.tensor([new_ids])).logits[0]
    assert mod.results["after"]["gt_prob"] == pytest.approx(answer_prob(after, new_positions, [new]),
                                                            rel=1e-4)
    mod.undo()


def test_erase_without_target_reads_the_greedy_prediction():
    adapter = make("gpt2")
    expected = hand_edited(adapter.model, "gpt2", {0: [3], 2: [7, 8]},
                           lambda *_: torch.zeros(adapter.d_model))
    with torch.no_grad():
        greedy = int(expected(input_ids=torch.tensor([CAUSAL_PROMPT])).logits[0, -1].argmax())
    results, _ = erase_knowledge(adapter, CAUSAL_PROMPT, NEURONS)
    assert results["before"]["gt_prob"] is None and results["after"]["gt_prob"] is None
    assert results["after"]["argmax_completion"] == f"w{greedy}"


def test_bad_input_is_one_line_and_changes_nothing():
    adapter = make("gpt2")
    params = snapshot(adapter.model)
    cases = [
        (lambda: suppress_knowledge(adapter, CAUSAL_PROMPT, ANSWER, [[LAYERS, 0]]), "layer"),
        (lambda: enhance_knowledge(adapter, CAUSAL_PROMPT, ANSWER, [[0, adapter.d_ff]]), "out of range"),
        (lambda: erase_knowledge(adapter, CAUSAL_PROMPT, [[0, 1], [1, -1]]), "out of range"),
        (lambda: erase_knowledge(adapter, CAUSAL_PROMPT, [[0, 1]], erase_value="mean"), "erase_value"),
        (lambda: edit_knowledge(adapter, CAUSAL_PROMPT, ANSWER, [[0, 1, 2]]), "pair"),
    ]
    for call, words in cases:
        with pytest.raises(FflayersError, match=words) as err:
            call()
        assert "\n" not in str(err.value)
    adapter.tokenizer.unk_token_id = None
    with pytest.raises(FflayersError, match="unknown token"):
        erase_knowledge(adapter, CAUSAL_PROMPT, [[0, 1]], erase_value="unk")
    assert all(torch.equal(v, params[k]) for k, v in adapter.model.state_dict().items())


# ----- convention="kn-package": the package's hook point (GPT-2: mlp.c_fc output, before the GELU) --------


def wide_gpt2():
    """A tiny random GPT2LMHeadModel with O(1) pre-activations (initializer_range 0.5), where GELU(2k) and
    2 GELU(k) differ clearly."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=50, n_embd=16, n_inner=32, n_head=2, n_layer=2, n_positions=16,
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, initializer_range=0.5, bos_token_id=0,
                        eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg).eval()


GPT2_PROMPT = [3, 14, 15, 9, 2]


def _hooked_prob(model, hooks: list[tuple[torch.nn.Module, str, list[int], float]], token: int) -> float:
    """P(token) after the prompt with each ``(module, "output" | "input", neurons, factor)`` scaling those
    neurons at the last position only (plain torch hooks)."""
    def scaled(x, neurons, factor):
        y = x.clone()
        y[:, -1, neurons] = y[:, -1, neurons] * factor
        return y

    handles = []
    for module, side, neurons, factor in hooks:
        if side == "output":
            handles.append(module.register_forward_hook(
                lambda _m, _a, out, n=neurons, f=factor: scaled(out, n, f)))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, n=neurons, f=factor: (scaled(args[0], n, f), *args[1:])))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([GPT2_PROMPT])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(torch.softmax(logits.double(), -1)[token])


def _gpt2_setup():
    """Model, adapter, the model's own top answer, and per layer the two neurons with the most negative
    pre-activation at the last prompt position."""
    model = wide_gpt2()
    keys = {}
    handles = [block.mlp.c_fc.register_forward_hook(
        lambda _m, _a, out, layer=layer: keys.update({layer: out[0, -1].detach().clone()}))
        for layer, block in enumerate(model.transformer.h)]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([GPT2_PROMPT])).logits[0, -1]
    for h in handles:
        h.remove()
    chosen = {layer: torch.argsort(k)[:2].tolist() for layer, k in keys.items()}
    assert all(keys[layer][i] < -0.5 for layer, idx in chosen.items() for i in idx)
    adapter = HFAdapter(model, tokenizer=StubTokenizer(), device="cpu")
    return model, adapter, int(logits.argmax()), chosen


def test_kn_package_enhance_doubles_gpt2_pre_activation():
    """kn-package enhance == a hand-written hook doubling the chosen neurons of ``mlp.c_fc``'s output at the
    last position (GELU(2k)); paper enhance == the same on ``mlp.act``'s output / ``mlp.c_proj``'s input
    (2 GELU(k)), and the two differ."""
    model, adapter, answer, chosen = _gpt2_setup()
    neurons = [[layer, i] for layer, idx in chosen.items() for i in idx]
    blocks = model.transformer.h
    plain = _hooked_prob(model, [], answer)
    pre = _hooked_prob(model, [(blocks[layer].mlp.c_fc, "output", idx, 2.0) for layer, idx in chosen.items()],
                       answer)
    post = _hooked_prob(model, [(blocks[layer].mlp.act, "output", idx, 2.0) for layer, idx in chosen.items()],
                        answer)
    post_in = _hooked_prob(model, [(blocks[layer].mlp.c_proj, "input", idx, 2.0)
                                   for layer, idx in chosen.items()], answer)
    assert post == pytest.approx(post_in, abs=1e-9)
    results = {}
    for convention in ("paper", "kn-package"):
        kn = KnowledgeNeurons(adapter, convention=convention)
        got, _ = kn.enhance_knowledge(GPT2_PROMPT, [answer], neurons, quiet=True)
        assert got["before"]["gt_prob"] == pytest.approx(plain, abs=1e-6)
        results[convention] = got["after"]["gt_prob"]
        # the module function with the same convention does the same
        same, _ = enhance_knowledge(adapter, GPT2_PROMPT, [answer], neurons, convention=convention)
        assert same["after"]["gt_prob"] == results[convention]
    print(f"\nafter enhance: paper {results['paper']:.9f}, kn-package {results['kn-package']:.9f}, "
          f"hook on c_fc output {pre:.9f}, hook on act output {post:.9f} (before {plain:.9f})")
    assert results["kn-package"] == pytest.approx(pre, abs=1e-6)
    assert results["paper"] == pytest.approx(post, abs=1e-6)
    assert abs(pre - post) > 1e-3  # the two conventions are told apart


def test_kn_package_suppress_zeroes_gpt2_pre_activation():
    """kn-package suppress sets ``mlp.c_fc``'s output to 0 at the last position (what the GELU then reads);
    paper leaves it and zeroes the coefficient. Same probability either way (GELU(0) = 0), equal to a
    hand-written hook."""
    model, adapter, answer, chosen = _gpt2_setup()
    neurons = [[layer, i] for layer, idx in chosen.items() for i in idx]
    blocks = model.transformer.h
    want = _hooked_prob(model, [(blocks[layer].mlp.c_fc, "output", idx, 0.0)
                                for layer, idx in chosen.items()], answer)
    for convention, zero_before_gelu in (("paper", False), ("kn-package", True)):
        kn = KnowledgeNeurons(adapter, convention=convention)
        mod = kn.suppress_knowledge(GPT2_PROMPT, [answer], neurons, undo_modification=False, quiet=True)
        assert mod.results["after"]["gt_prob"] == pytest.approx(want, abs=1e-6)
        seen: dict[int, torch.Tensor] = {}
        handles = [blocks[layer].mlp.act.register_forward_pre_hook(
            lambda _m, args, layer=layer, seen=seen: seen.update({layer: args[0][0, -1].detach().clone()}))
            for layer in chosen]
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([GPT2_PROMPT]))
        finally:
            for h in handles:
                h.remove()
            mod.undo()
        for layer, idx in chosen.items():
            assert bool((seen[layer][idx] == 0).all()) is zero_before_gelu


def test_bad_convention_is_one_line():
    adapter = make("gpt2")
    with pytest.raises(FflayersError, match="unknown convention"):
        enhance_knowledge(adapter, CAUSAL_PROMPT, ANSWER, [[0, 1]], convention="package")
