"""prefix_cache / run_cached: the stream after a cached prefix equals the whole sequence's last positions."""

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.hooks import capture
from tests.fixtures.hf_models import tiny_model

IDS = torch.tensor([[11, 5, 9, 13, 7, 12, 4]])


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "gptj", "gpt_neox", "llama"])
def test_cached_prefix_equals_whole_sequence(arch):
    adapter = HFAdapter(tiny_model(arch), device="cpu")
    with torch.no_grad(), capture(adapter, "mlp_coef", [1]) as whole:
        full = adapter.run(IDS.expand(3, -1))
    cache = adapter.prefix_cache(IDS[:, :4], 3)
    assert cache is not None
    with torch.no_grad(), capture(adapter, "mlp_coef", [1]) as part:
        tail = adapter.run_cached(cache, IDS[:, 4:].expand(3, -1))
    torch.testing.assert_close(tail, full[:, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part["mlp_coef", 1], whole["mlp_coef", 1][:, 4:], rtol=1e-5, atol=1e-5)


def test_masked_lm_and_fairseq_have_no_prefix_cache(fairseq_adapters):
    assert HFAdapter(tiny_model("bert"), device="cpu").prefix_cache(IDS[:, :3], 2) is None
    assert fairseq_adapters("fairseq_prenorm_lm").prefix_cache(IDS[:, :3], 2) is None
