"""Right-padded batches of encoded facts, in input order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.data.batching import pad_right
from fflayers.recall.facts import EncodedFact


@dataclass
class FactBatch:
    """Facts ``items`` as one batch: ``ids`` ``[B, T]`` right-padded with the adapter's pad id, ``mask``
    ``[B, T]`` True on real tokens, ``last`` ``[B]`` the index of each row's last real token (all on the
    adapter's device). Right padding keeps every real token at its own position."""

    items: list[EncodedFact]
    ids: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor

    def __len__(self) -> int:
        return len(self.items)


def make_fact_batch(adapter: LMAdapter, items: Sequence[EncodedFact]) -> FactBatch:
    """One :class:`FactBatch` of ``items``."""
    if not items:
        raise InputError("cannot batch zero facts")
    ids, mask = pad_right([e.ids for e in items], adapter.vocab.pad_id)
    last = torch.tensor([e.last for e in items], dtype=torch.long)
    dev = adapter.device
    return FactBatch(list(items), ids.to(dev), mask.to(dev), last.to(dev))


def fact_batches(adapter: LMAdapter, encoded: Sequence[EncodedFact], batch_size: int) -> Iterator[FactBatch]:
    """Consecutive batches of at most ``batch_size`` facts, in input order."""
    if batch_size < 1:
        raise InputError(f"batch_size {batch_size} must be >= 1")
    for start in range(0, len(encoded), batch_size):
        yield make_fact_batch(adapter, encoded[start : start + batch_size])
