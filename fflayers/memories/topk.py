"""Streaming top-k per key: the k sentences with the largest (positive) activation of each key.

The state lives on the device that produced the activations: ``keys`` ``[n_keys, k]`` (int64 composite
sort keys, best first, 0 where empty) and ``positions`` ``[n_keys, k]`` (int64, -1 where empty). Each update
builds composite keys for the new candidates, concatenates them with the buffer and keeps the k best with
one ``torch.topk``, so there is no Python loop over keys. ``values`` and ``sentence_ids`` are decoded from
the composite keys on access.

Composite key of a candidate with value v > 0 and sentence id s: the float32 bits of v (as an int, which
orders positive floats like the floats) in the high 32 bits, ``2**32 - 2 - s`` in the low 32 bits. Hence the
order is deterministic: larger value first, equal values by smaller sentence id; no two real candidates of
a key compare equal (sentence ids are unique per key), so the result does not depend on batch sizes, batch
order or the order in which partial results are merged. Only activations > 0 enter; NaN, zero and negative
values never do.
"""

from __future__ import annotations

import torch

from fflayers.core import InputError

_LOW = 1 << 32
_MAX_ID = _LOW - 2  # sentence ids must lie in 0 .. 2**32 - 2
_EMPTY = 0  # composite key of an empty slot: below every real candidate (whose high half is >= 1)


def encode(values: torch.Tensor, sentence_ids: torch.Tensor) -> torch.Tensor:
    """Composite int64 keys of candidates (``sentence_ids`` broadcast against ``values``); 0 where
    value <= 0."""
    values = values.to(torch.float32).contiguous()
    high = values.view(torch.int32).to(torch.int64) << 32
    return torch.where(values > 0, high + (_MAX_ID - sentence_ids), _EMPTY)


def decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values float32, sentence_ids int64)`` of composite keys; empty slots give ``(-inf, -1)``."""
    filled = keys != _EMPTY
    values = (keys >> 32).to(torch.int32).view(torch.float32)
    values = torch.where(filled, values, torch.full_like(values, float("-inf")))
    ids = torch.where(filled, _MAX_ID - (keys & (_LOW - 1)), -1)
    return values, ids


def merge_topk(keys: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row of ``[n_keys, m]`` composite keys (m >= k), best first, with their positions."""
    top = torch.topk(keys, k, dim=1, largest=True, sorted=True)
    return top.values, torch.where(top.values != _EMPTY, positions.gather(1, top.indices), -1)


class StreamingTopK:
    """Top-k sentences per key, updated batch by batch (see module docstring for the order).

    >>> tk = StreamingTopK(n_keys=4096, k=50, device="cuda")
    >>> tk.update(batch_max, batch_argmax, sentence_ids)   # [n_keys, B], [n_keys, B], [B]
    >>> tk.values, tk.sentence_ids, tk.positions            # [n_keys, k] each, best first
    """

    def __init__(self, n_keys: int, k: int, device: torch.device | str | None = "cpu") -> None:
        if k < 1:
            raise InputError(f"k={k} must be >= 1; pass the number of top sentences to keep per key")
        if n_keys < 1:
            raise InputError(f"n_keys={n_keys} must be >= 1; select at least one layer and one dim")
        self.n_keys, self.k = int(n_keys), int(k)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.keys = torch.full((n_keys, k), _EMPTY, dtype=torch.int64, device=device)
        self.positions = torch.full((n_keys, k), -1, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def values(self) -> torch.Tensor:
        """float32 ``[n_keys, k]``, best first, ``-inf`` where empty."""
        return decode(self.keys)[0]

    @property
    def sentence_ids(self) -> torch.Tensor:
        """int64 ``[n_keys, k]``, -1 where empty."""
        return decode(self.keys)[1]

    def _merge(self, keys: torch.Tensor, positions: torch.Tensor) -> None:
        self.keys, self.positions = merge_topk(torch.cat([self.keys, keys], 1),
                                               torch.cat([self.positions, positions], 1), self.k)

    def update(self, batch_max: torch.Tensor, batch_argmax: torch.Tensor, sentence_ids: torch.Tensor) -> None:
        """Merge one batch: per key and sentence, the max activation ``[n_keys, B]`` and its position
        ``[n_keys, B]``; ``sentence_ids`` ``[B]`` are global sentence indices (unique across updates)."""
        if batch_max.dim() != 2 or batch_max.shape[0] != self.n_keys:
            raise InputError(f"batch_max has shape {tuple(batch_max.shape)}, expected [{self.n_keys}, batch]")
        if batch_argmax.shape != batch_max.shape:
            raise InputError(f"batch_argmax has shape {tuple(batch_argmax.shape)}, "
                             f"expected {tuple(batch_max.shape)}")
        dev = self.device
        sid = torch.as_tensor(sentence_ids).reshape(-1)
        if sid.numel() != batch_max.shape[1]:
            raise InputError(f"{sid.numel()} sentence ids for a batch of {batch_max.shape[1]} sentences")
        if sid.numel() and (int(sid.min()) < 0 or int(sid.max()) > _MAX_ID):
            raise InputError(f"sentence ids must lie in 0..{_MAX_ID}")
        keys = encode(batch_max.to(dev), sid.to(dev, torch.int64))
        self._merge(keys, batch_argmax.to(dev, torch.int64))

    def add(self, batch_max: torch.Tensor, batch_argmax: torch.Tensor, sentence_ids: torch.Tensor) -> None:
        """:meth:`update` (the name of the state protocol of :mod:`fflayers.runs.accumulators`)."""
        self.update(batch_max, batch_argmax, sentence_ids)

    def merge(self, other: StreamingTopK) -> StreamingTopK:
        """Fold another top-k over disjoint sentences (a shard, another rank) into this one; returns self."""
        if other.n_keys != self.n_keys or other.k != self.k:
            raise InputError(
                f"cannot merge a top-{other.k} of {other.n_keys} keys into a top-{self.k} of {self.n_keys} "
                "keys; mine both with the same layers, dims and k"
            )
        self._merge(other.keys.to(self.device), other.positions.to(self.device))
        return self

    def counts(self) -> torch.Tensor:
        """Number of filled slots per key ``[n_keys]``."""
        return (self.keys != _EMPTY).sum(1)

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """CPU copy of the state (for checkpoints): values, sentence ids and positions."""
        values, ids = decode(self.keys)
        return {"n_keys": self.n_keys, "k": self.k, "values": values.cpu(), "sentence_ids": ids.cpu(),
                "positions": self.positions.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by :meth:`state_dict` (onto this object's device)."""
        if int(state["n_keys"]) != self.n_keys or int(state["k"]) != self.k:
            raise InputError(
                f"saved top-k has {state['n_keys']} keys and k={state['k']}, "
                f"expected {self.n_keys} and {self.k}"
            )
        dev = self.device
        ids = state["sentence_ids"].to(dev, torch.int64)
        self.keys = torch.where(ids >= 0, encode(state["values"].to(dev), ids), _EMPTY)
        self.positions = state["positions"].to(dev, torch.int64)

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str | None = "cpu") -> StreamingTopK:
        out = cls(int(state["n_keys"]), int(state["k"]), device=device)
        out.load_state_dict(state)
        return out


def all_gather_merge(topk: StreamingTopK, group=None) -> StreamingTopK:
    """Merge the top-k of every ``torch.distributed`` rank (each over its own sentences); every rank gets
    the same result. The merge is the one used within a rank, so the result equals a single-process run."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    gathered = []
    for buf in (topk.keys, topk.positions):
        parts = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(parts, buf.contiguous(), group=group)
        gathered.append(parts)
    out = StreamingTopK(topk.n_keys, topk.k, device=topk.device)
    for keys, pos in zip(*gathered, strict=True):
        out._merge(keys, pos)
    return out
