"""The facts a model knows: its top-1 next token after each prompt, and the facts whose top-1 is the
attribute."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fflayers.backends.base import LMAdapter
from fflayers.recall.batching import fact_batches
from fflayers.recall.facts import EncodedFact


@torch.inference_mode()
def top1_predictions(adapter: LMAdapter, encoded: Sequence[EncodedFact],
                     batch_size: int = 32) -> tuple[list[int], list[float]]:
    """The model's top-1 next token after each prompt and its probability."""
    tokens: list[int] = []
    probs: list[float] = []
    for batch in fact_batches(adapter, encoded, batch_size):
        h = adapter.run(batch.ids, batch.mask)
        lp = adapter.project(h[torch.arange(len(batch.items), device=h.device), batch.last])
        best = lp.float().max(dim=-1)
        tokens += best.indices.tolist()
        probs += best.values.exp().tolist()
    return tokens, probs


def filter_facts(adapter: LMAdapter, encoded: Sequence[EncodedFact],
                 batch_size: int = 32) -> list[EncodedFact]:
    """The facts whose top-1 next token is the attribute's first token (ROME's "known" facts), in order."""
    tokens, _ = top1_predictions(adapter, encoded, batch_size)
    return [e for e, t in zip(encoded, tokens, strict=True) if t == e.attribute_id]
