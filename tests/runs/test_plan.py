"""The plan: at least four shards per worker whenever there are that many units, contiguous and complete."""

from __future__ import annotations

import pytest

from fflayers.runs import SHARDS_PER_WORKER, Workers, choose_n_shards, group_units, make_plan


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("n_units", [1, 3, 7, 31, 32, 33, 500])
def test_at_least_four_shards_per_worker(n_units, workers):
    weights = [5 + u % 4 for u in range(n_units)]
    plan = make_plan(weights, workers, shard_weight=10_000)  # large shards: the worker rule decides
    assert plan["n_shards"] == min(n_units, SHARDS_PER_WORKER * workers)
    if n_units >= SHARDS_PER_WORKER * workers:
        assert plan["n_shards"] >= 4 * workers
    # contiguous shards covering every unit once, in order, with their weights
    flat = [u for a, b in plan["shards"] for u in range(a, b)]
    assert flat == list(range(n_units)) and all(b > a for a, b in plan["shards"])
    assert plan["shard_weights"] == [sum(weights[a:b]) for a, b in plan["shards"]]
    sizes = [b - a for a, b in plan["shards"]]
    assert max(sizes) - min(sizes) <= 1
    assert plan["total_weight"] == sum(weights) and plan["n_units"] == n_units and plan["workers"] == workers


def test_every_worker_gets_shards():
    plan = make_plan([1] * 40, 8)
    n = plan["n_shards"]
    per_worker = [Workers(job=j, jobs=2, rank=r, world=4).job_shards(n) for j in range(2) for r in range(4)]
    job0, job1 = per_worker[0], per_worker[4]  # a job's ranks share the job's shards
    assert job0 == per_worker[1] and job1 == per_worker[7]
    assert sorted(job0 + job1) == list(range(n)) and not set(job0) & set(job1)
    assert len(job0) == len(job1) == n // 2 >= 4 * 4


def test_large_runs_by_weight():
    assert choose_n_shards(1000, 1_000_000, 2) == 100  # about 10,000 per shard
    assert choose_n_shards(1000, 1_000_000, 2, shard_weight=200_000) == 8  # 4 per worker floor
    assert choose_n_shards(3, 300, 2) == 3  # never more shards than units
    assert choose_n_shards(0, 0, 4) == 1 and make_plan([], 4)["n_shards"] == 0
    plan = make_plan([2] * 10, 1, shard_weight=4, unit_name="facts", total_weight=100)
    assert plan["n_shards"] == 10 and plan["unit_name"] == "facts" and plan["total_weight"] == 100


def test_group_units():
    assert group_units([3, 3, 3, 1, 5], 5) == [range(0, 2), range(2, 5)]
    assert group_units([1, 1, 1], 10) == [range(0, 3)]
    assert group_units([0.5, 0.5, 2.0], 1.0) == [range(0, 2), range(2, 3)]
    assert group_units([], 4) == []
