"""The lenses vs independent computations: transformers' own hidden states and logits, maps applied by hand,
a hand-written patching hook."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import InputError, ModelError
from fflayers.data.batching import pad_right
from fflayers.lenses import LinearShortcutLens, LogitLens, TokenIdentityPatchscope, TunedLens, sequence_states
from tests.fixtures.hf_models import tiny_model
from tests.lenses.conftest import hidden_states, sequences

TOL = dict(rtol=1e-4, atol=1e-4)


def final_norm_and_head(adapter):
    m = adapter.model
    if adapter.family == "gpt2":
        return m.transformer.ln_f, m.lm_head
    return m.model.norm, m.lm_head


def test_sequence_states_are_transformers_hidden_states(lm):
    seqs = sequences(3)
    ids, mask = pad_right(seqs, 0)
    got = sequence_states(lm, ids, mask)
    want = torch.cat([hidden_states(lm, s)[0] for s in seqs])
    assert got.shape == (sum(map(len, seqs)), lm.n_layers + 1, lm.d_model)
    torch.testing.assert_close(got, want, **TOL)


def test_logit_lens_of_the_last_layer_is_the_models_own_log_probs(lm):
    states, log_probs = hidden_states(lm, sequences(1)[0])
    got = LogitLens(lm).log_probs(states[:, lm.n_layers], lm.n_layers)
    torch.testing.assert_close(got, log_probs, **TOL)
    # an earlier layer: the model's final norm and head on that state, by hand
    norm, head = final_norm_and_head(lm)
    with torch.no_grad():
        want = torch.log_softmax(head(norm(states[:, 1])).float(), -1)
    torch.testing.assert_close(LogitLens(lm).log_probs(states[:, 1], 1), want, **TOL)


def test_tuned_lens_with_zero_translators_is_the_logit_lens(lm):
    states, _ = hidden_states(lm, sequences(1)[0])
    tuned, logit = TunedLens(lm), LogitLens(lm)
    with torch.no_grad():
        for layer in range(lm.n_layers + 1):
            h = states[:, layer]
            assert torch.equal(tuned.log_probs(h, layer), logit.log_probs(h, layer))


def test_mat_lens_is_the_map_applied_by_hand(lm):
    L, d = lm.n_layers, lm.d_model
    g = torch.Generator().manual_seed(3)
    maps = {(L, layer): torch.randn(d, d, generator=g) / d**0.5 for layer in range(L)}
    biases = {1: torch.randn(d, generator=g)}
    lens = LinearShortcutLens(lm, maps, biases)
    states, _ = hidden_states(lm, sequences(1)[0])
    norm, head = final_norm_and_head(lm)
    with torch.no_grad():
        for layer in range(L):
            mapped = states[:, layer] @ maps[L, layer].T + (biases[1] if layer == 1 else 0)
            want = torch.log_softmax(head(norm(mapped)).float(), -1)
            torch.testing.assert_close(lens.log_probs(states[:, layer], layer), want, **TOL)
        torch.testing.assert_close(lens.log_probs(states[:, L], L), LogitLens(lm).log_probs(states[:, L], L))


def test_hybrid_starts_at_the_mat_solution(lm):
    L, d = lm.n_layers, lm.d_model
    g = torch.Generator().manual_seed(4)
    maps = {(L, layer): torch.randn(d, d, generator=g) for layer in range(L)}
    hybrid = TunedLens.from_shortcuts(lm, maps)
    h = torch.randn(7, d, generator=g)
    with torch.no_grad():
        for layer in range(L):
            torch.testing.assert_close(hybrid.transform(h, layer), h @ maps[L, layer].T, **TOL)
    with pytest.raises(InputError, match=r"needs the shortcut map"):
        TunedLens.from_shortcuts(lm, {(L, 0): maps[L, 0]})


def test_patchscope_equals_a_hand_written_patching_hook(llama):
    prompt = [3, 17, 9, 3, 25, 40, 25, 11]
    scope = TokenIdentityPatchscope(llama, prompt, batch_size=2)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, llama.d_model, generator=g)
    for layer in (0, 2):
        got = scope.log_probs(h, layer)
        block = llama.model.model.layers[layer]
        want = []
        for row in h:
            def patch(_module, args, kwargs, row=row):
                x = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
                x[:, -1] = row
                if "hidden_states" in kwargs:
                    return args, {**kwargs, "hidden_states": x}
                return (x, *args[1:]), kwargs

            handle = block.register_forward_pre_hook(patch, with_kwargs=True)
            try:
                with torch.no_grad():
                    logits = llama.model(input_ids=torch.tensor([prompt])).logits[0, -1]
            finally:
                handle.remove()
            want.append(torch.log_softmax(logits.float(), -1))
        torch.testing.assert_close(got, torch.stack(want), **TOL)
    # the last layer: patching the final stream is reading it with the head
    L = llama.n_layers
    torch.testing.assert_close(scope.log_probs(h, L), LogitLens(llama).log_probs(h, L))


def test_bad_layers_and_masked_lms(lm):
    with pytest.raises(InputError, match=r"lens layer 9 out of range: states are 0\.\.3"):
        LogitLens(lm).log_probs(torch.zeros(1, lm.d_model), 9)
    with pytest.raises(InputError, match="no shortcut map from layer 1"):
        LinearShortcutLens(lm, {}).log_probs(torch.zeros(1, lm.d_model), 1)
    with pytest.raises(ModelError, match="masked LM"):
        LogitLens(HFAdapter(tiny_model("bert"), device="cpu"))


def test_bf16_autocast_states_are_close_to_fp32(llama):
    seqs = sequences(2)
    ids, mask = pad_right(seqs, 0)
    full = sequence_states(llama, ids, mask)
    half = sequence_states(llama, ids, mask, "bf16")
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)
    with pytest.raises(InputError, match="dtype 'int8' unknown"):
        sequence_states(llama, ids, mask, "int8")
