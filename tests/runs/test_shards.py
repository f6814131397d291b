"""Finished shards whose files are truncated, corrupt or missing are computed again with a warning, never
merged and never fatal; planted pickles are refused."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fflayers.runs import RecomputeWarning, ShardFileError, load_shard, run_units, save_shard, shard_file
from fflayers.safe_pickle import UnsafePickleError
from tests.runs.toy import KIND, ToyConfig, ToyTask, expected

CONFIG = ToyConfig(units=6)


def run(run_dir, computed: list[int] | None = None):
    task = ToyTask(CONFIG, on_unit=None if computed is None else computed.append)
    return run_units(task, CONFIG, kind=KIND, run_dir=run_dir, shard_weight=1, progress=False)


def assert_whole(out):
    want = expected(CONFIG)
    assert out.result.count == want.count and torch.equal(out.result.total, want.total)


def damage_truncate(path):
    path.write_bytes(path.read_bytes()[:-40])


def damage_flip(path):  # same size, other bytes: only the hash tells
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def damage_garbage_same_size(path):
    path.write_bytes(b"\0" * path.stat().st_size)


def damage_delete(path):
    path.unlink()


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip, damage_garbage_same_size, damage_delete])
def test_damaged_shard_is_recomputed_with_a_warning(tmp_path, damage):
    run_dir = tmp_path / "run"
    first = run(run_dir)
    assert first.plan["n_shards"] == 6 and first.computed_all == 6
    damage(shard_file(run_dir, 2))
    computed: list[int] = []
    with pytest.warns(RecomputeWarning, match="shard 2"):
        out = run(run_dir, computed)
    assert computed == [2]  # units of shard 2 only
    assert out.reused == 5 and out.computed_all == 1
    assert_whole(out)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["shards"])
    computed.clear()
    again = run(run_dir, computed)  # the recomputed shard was saved again
    assert computed == [] and again.reused == 6 and again.recomputed == []
    assert_whole(again)


def test_manifest_records_size_and_hash(tmp_path):
    run(tmp_path / "run")
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["shards"][0]
    path = shard_file(tmp_path / "run", 0)
    assert entry["bytes"] == path.stat().st_size and len(entry["sha256"]) == 64
    assert not [p for p in os.listdir(tmp_path / "run") if p.endswith(".tmp")]  # atomic writes leave nothing


def test_load_shard_checks(tmp_path):
    saved = save_shard(tmp_path, 3, "hash-a", {"x": torch.arange(3)})
    assert torch.equal(load_shard(tmp_path, 3, "hash-a", saved["sha256"])["x"], torch.arange(3))
    with pytest.raises(ShardFileError, match="another run"):
        load_shard(tmp_path, 3, "hash-b")
    with pytest.raises(ShardFileError, match="does not match its hash"):
        load_shard(tmp_path, 3, "hash-a", "0" * 64)
    with pytest.raises(ShardFileError, match="unreadable"):
        load_shard(tmp_path, 4, "hash-a")


class Planted:
    def __reduce__(self):
        return (os.system, ("true",))


def test_planted_pickle_is_refused(tmp_path):
    torch.save({"config_hash": "h", "shard": 0, "state": Planted()}, shard_file(tmp_path, 0))
    with pytest.raises(UnsafePickleError):
        load_shard(tmp_path, 0, "h")
