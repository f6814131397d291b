"""Hook machinery: hooks are always removed, edits select exactly what they name, bad arguments fail
clearly."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import ModelError
from fflayers.hooks import add, attention_with_blocked_edges, capture, hooked, intervene, replace, scale
from tests.fixtures.hf_models import tiny_model


def n_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_even_when_the_body_raises():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    before = n_hooks(adapter.model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(adapter, ["mlp_key", "resid_post"]), intervene(adapter, [scale("mlp_coef", 0, 2.0)]):
            assert n_hooks(adapter.model) > before
            raise RuntimeError("boom")
    assert n_hooks(adapter.model) == before


def test_edit_helpers_on_a_plain_tensor():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    y = scale("mlp_coef", 0, 10.0, positions=[1], index=[0, 2]).fn(x)
    expected = x.clone()
    expected[:, 1, 0] *= 10
    expected[:, 1, 2] *= 10
    assert torch.equal(y, expected)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    y = add("mlp_coef", 0, 1.0, positions=mask).fn(x)
    expected = x.clone()
    expected[0, 0] += 1
    expected[1, 2] += 1
    assert torch.equal(y, expected)
    y = replace("mlp_coef", 0, torch.tensor([7.0, 8.0]), index=[3, 1]).fn(x)
    assert torch.equal(y[..., 3], torch.full((2, 3), 7.0)) and torch.equal(y[..., 1], torch.full((2, 3), 8.0))
    assert torch.equal(y[..., [0, 2]], x[..., [0, 2]])


def test_position_errors_are_one_line():
    x = torch.zeros(1, 3, 2)
    with pytest.raises(ModelError, match="position out of range"):
        scale("mlp_coef", 0, 0.0, positions=[5]).fn(x)
    with pytest.raises(ModelError, match="position mask has shape"):
        scale("mlp_coef", 0, 0.0, positions=torch.ones(2, 3, dtype=torch.bool)).fn(x)


def test_raw_hook_sees_batch_first_tensor():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    seen = []
    with hooked(adapter, [("mlp_key", 0, lambda x: seen.append(tuple(x.shape)))]):
        adapter.run(torch.zeros(2, 5, dtype=torch.long))
    assert seen == [(2, 5, adapter.d_ff)]


def test_attention_with_blocked_edges_matches_manual_softmax():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 2, 3, 3, generator=g)
    value = torch.randn(1, 2, 3, 4, generator=g)
    allowed = torch.ones(3, 3, dtype=torch.bool).tril()
    blocked = torch.zeros(3, 3, dtype=torch.bool)
    blocked[2, 0] = True
    blocked[1, :] = True
    out = attention_with_blocked_edges(scores, allowed, blocked, value)
    # row 0: only key 0; row 1: nothing left -> zeros; row 2: keys 1 and 2
    torch.testing.assert_close(out[..., 0, :], value[..., 0, :])
    assert torch.equal(out[..., 1, :], torch.zeros(1, 2, 4))
    w = torch.softmax(scores[..., 2, 1:3], -1)
    torch.testing.assert_close(out[..., 2, :], (w[..., None] * value[..., 1:3, :]).sum(-2))
