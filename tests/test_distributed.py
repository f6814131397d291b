import pytest

from fflayers.core import FflayersError
from fflayers.distributed import dist_info, gather_objects, shard_range


@pytest.mark.parametrize("n,world", [(0, 3), (1, 2), (7, 3), (10, 5), (3, 8)])
def test_shards_cover_in_order(n, world):
    parts = [list(shard_range(n, r, world)) for r in range(world)]
    assert sum(parts, []) == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_bad_shard_and_env(monkeypatch):
    with pytest.raises(FflayersError, match="out of range"):
        shard_range(5, 2, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(FflayersError, match="out of range"):
        dist_info()


def test_single_process():
    assert dist_info().world_size >= 1
    assert gather_objects({"a": 1}) == [{"a": 1}]


@pytest.mark.parametrize("spec,want", [("0/1", (0, 1)), ("2/3", (2, 3))])
def test_shard_spec(spec, want):
    from fflayers.distributed import parse_shard_spec

    assert parse_shard_spec(spec) == want


@pytest.mark.parametrize("spec", ["3/2", "0/0", "1", "a/b", "1/2/3"])
def test_bad_shard_spec(spec):
    from fflayers.distributed import parse_shard_spec

    with pytest.raises(FflayersError, match="shard spec"):
        parse_shard_spec(spec)


def test_single_process_gather_to_main_and_broadcast():
    from fflayers.distributed import broadcast_from_main, gather_to_main

    assert gather_to_main(3) == [3] and broadcast_from_main("x") == "x"
