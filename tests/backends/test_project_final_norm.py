"""``LMAdapter.project(h, final_norm=False)``: the head without the final norm, against the models' own heads."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from tests.fixtures.hf_models import HF_ARCHS, tiny_model


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_projection_without_final_norm_is_the_bare_head(arch):
    model = tiny_model(arch)
    adapter = HFAdapter(model, device="cpu")
    h = torch.randn(2, 5, adapter.d_model)
    with torch.no_grad():
        got = adapter.project(h, final_norm=False)
        normed = adapter.project(h)
        if arch == "bert":  # no final norm: the MLM head (with its own transform) either way
            expected = torch.log_softmax(model.cls(h), dim=-1)
        else:
            expected = torch.log_softmax(model.get_output_embeddings()(h), dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if arch == "bert":
        torch.testing.assert_close(normed, got)
    else:  # the final norm matters (the fixtures perturb norm weights)
        assert not torch.allclose(normed, got, atol=1e-3)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("name", ["fairseq_prenorm_lm", "fairseq_adaptive_lm", "fairseq_plain_lm"])
def test_fairseq_projection_without_final_norm(name, fairseq_adapters):
    adapter = fairseq_adapters(name)
    dec = adapter.model.decoder
    h = torch.randn(1, 4, adapter.d_model)
    with torch.no_grad():
        got = adapter.project(h, final_norm=False)
        # fairseq's own head on the un-normalised features (adaptive softmax reads features)
        expected = adapter.model.get_normalized_probs((dec.output_layer(h), None), log_probs=True)
        normed = adapter.project(h)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    if dec.layer_norm is None:  # post-LN model: nothing to skip
        torch.testing.assert_close(normed, got)
    else:
        with torch.no_grad():
            expected_normed = adapter.model.get_normalized_probs((dec.output_layer(dec.layer_norm(h)), None),
                                                                 log_probs=True)
        torch.testing.assert_close(normed, expected_normed.float(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(normed, got, atol=1e-3)
