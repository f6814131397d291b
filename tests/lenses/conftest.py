"""Tiny causal LMs and token sequences for the lens tests."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from tests.fixtures.hf_models import VOCAB, tiny_model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request) -> HFAdapter:
    return HFAdapter(tiny_model(request.param), device="cpu")


@pytest.fixture(scope="module")
def llama() -> HFAdapter:
    return HFAdapter(tiny_model("llama"), device="cpu")


def sequences(n: int = 6, seed: int = 0, low: int = 5, high: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(1, VOCAB, (t,), generator=g).tolist() for t in lengths]


def hidden_states(adapter: HFAdapter, ids: list[int]) -> torch.Tensor:
    """``[T, L+1, d]`` from transformers' own ``output_hidden_states`` (the last one taken before the final
    norm with a plain hook on it)."""
    seen = {}
    norm = adapter.model.get_submodule("transformer.ln_f" if adapter.family == "gpt2" else "model.norm")
    def keep(_module, args, _output):
        seen.setdefault("h", args[0])

    handle = norm.register_forward_hook(keep)
    try:
        with torch.no_grad():
            out = adapter.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        handle.remove()
    hs = list(out.hidden_states[:-1]) + [seen["h"]]
    return torch.stack([h[0] for h in hs], dim=1), torch.log_softmax(out.logits[0].float(), -1)
