"""The plan of a run: units fixed by the data alone, grouped into contiguous shards.

A *unit* is the smallest piece of work (a length-bucketed batch of sentences, a block of facts, a layer) and
has a *weight* (its sentences, facts, ...), which sizes the plan and measures progress. The units must not
depend on the number of processes, so that a sharded run does the same floating-point work as one process.
Shards are contiguous runs of about equally many units (units are meant to cost about the same); their
number comes from the total weight and the number of workers: about ``shard_weight`` per shard, and at
least :data:`SHARDS_PER_WORKER` per worker whenever there are that many units, so every worker gets work
and a killed run loses little.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fflayers.distributed import shard_range

__all__ = ["SHARD_WEIGHT", "SHARDS_PER_WORKER", "choose_n_shards", "group_units", "make_plan"]

#: The weight (sentences, facts) a shard holds in large runs.
SHARD_WEIGHT = 10_000
#: Shards per worker at least, when there are enough units.
SHARDS_PER_WORKER = 4


def choose_n_shards(n_units: int, total_weight: float, n_workers: int,
                    shard_weight: float = SHARD_WEIGHT) -> int:
    """Shards of about ``shard_weight``, at least ``SHARDS_PER_WORKER`` per worker, at most one per unit."""
    want = max(math.ceil(total_weight / max(1, shard_weight)), SHARDS_PER_WORKER * max(1, n_workers))
    return max(1, min(n_units, want))


def group_units(sizes: Sequence[float], min_size: float) -> list[range]:
    """Consecutive items grouped greedily until a group reaches ``min_size`` (the last may hold less)."""
    groups: list[range] = []
    start = 0
    total: float = 0
    for i, size in enumerate(sizes):
        total += size
        if total >= min_size:
            groups.append(range(start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        groups.append(range(start, len(sizes)))
    return groups


def make_plan(
    weights: Sequence[float],
    n_workers: int,
    shard_weight: float = SHARD_WEIGHT,
    unit_name: str = "units",
    total_weight: float | None = None,
) -> dict:
    """The plan (JSON data) of units of ``weights`` for ``n_workers`` workers.

    ``unit_name`` names the weight in the manifest ("sentences", "facts"); ``total_weight`` (default: the sum
    of the weights) is what the number of shards is chosen for.
    """
    n_units = len(weights)
    total = sum(weights) if total_weight is None else total_weight
    n_shards = choose_n_shards(n_units, total, n_workers, shard_weight)
    shards = [shard_range(n_units, s, n_shards) for s in range(n_shards)] if n_units else []
    return {"n_units": n_units, "n_shards": len(shards), "workers": n_workers, "unit_name": unit_name,
            "total_weight": total, "shards": [[r.start, r.stop] for r in shards],
            "shard_weights": [sum(weights[u] for u in r) for r in shards]}
