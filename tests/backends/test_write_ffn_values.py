"""LMAdapter.write_ffn_values: in-place writes land in the model's own FFN output weights (read back from the
modules directly), and a backend whose ffn_values is a copy is refused."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.base import AdapterError
from fflayers.backends.hf import HFAdapter
from tests.fixtures.hf_models import HF_ARCHS, tiny_model
from tests.neurons.test_modify import FC_OUT


def written_rows(d: int, n: int) -> torch.Tensor:
    return torch.arange(n * d, dtype=torch.float32).reshape(n, d) / 7.0


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_writes_reach_the_output_projection(arch):
    adapter = HFAdapter(tiny_model(arch), device="cpu")
    module, layout = FC_OUT[arch]
    w = adapter.model.get_submodule(module.format(2)).weight
    before = w.detach().clone()
    rows = written_rows(adapter.d_model, 2)
    adapter.write_ffn_values(2, [5, 9], rows)
    got = w.detach()[[5, 9]] if layout == "rows" else w.detach()[:, [5, 9]].T
    assert torch.equal(got, rows)
    keep = [i for i in range(adapter.d_ff) if i not in (5, 9)]
    sel = (lambda t: t[keep]) if layout == "rows" else (lambda t: t[:, keep])
    assert torch.equal(sel(w.detach()), sel(before))
    assert not w.requires_grad or w.grad is None


def test_fairseq_writes_reach_fc2(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_plain_lm")
    fc2 = adapter.model.decoder.layers[1].fc2.weight
    saved = fc2.detach().clone()
    rows = written_rows(adapter.d_model, 1)
    try:
        adapter.write_ffn_values(1, [3], rows)
        assert torch.equal(fc2.detach()[:, 3], rows[0])
        assert torch.equal(fc2.detach()[:, 4:], saved[:, 4:])
    finally:
        with torch.no_grad():
            fc2.copy_(saved)


def test_bad_index_and_copies_are_refused():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    with pytest.raises(AdapterError, match="out of range"):
        adapter.write_ffn_values(0, [adapter.d_ff], written_rows(adapter.d_model, 1))

    class Copying(HFAdapter):
        def ffn_values(self, layer):
            return super().ffn_values(layer).clone()

    copying = Copying(tiny_model("gpt2"), device="cpu")
    with pytest.raises(AdapterError, match="copy"):
        copying.write_ffn_values(0, [1], written_rows(adapter.d_model, 1))
