"""Job arrays: each job writes a partial; the partials of all jobs merge, through the merge registered for
their kind, into the result of one run; mixed or incomplete sets are refused."""

from __future__ import annotations

import pytest
import torch

import fflayers.runs.partials as run_partials
from fflayers.core import InputError, RunStateError
from fflayers.runs import (
    Workers,
    find_partials,
    merge_all,
    merge_function,
    merge_partials,
    partial_header,
    partial_path,
    read_partial,
    register_merge,
    run_units,
    write_partial,
)
from tests.runs.toy import KIND, Mean, ToyConfig, ToyTask, expected


def merge_toy_states(states):
    return merge_all(states, Mean).state_dict()


register_merge(KIND, merge_toy_states)


def run_jobs(tmp_path, output, config, jobs, only=None):
    for job in range(jobs) if only is None else only:
        out = run_units(ToyTask(config), config, kind=KIND, run_dir=f"{output}.ckpt",
                        workers=Workers(job, jobs), shard_weight=1, progress=False)
        state = out.result.state_dict() if out.result is not None else None
        write_partial(partial_path(output, job, jobs), partial_header(out, output=str(output)), state,
                      {"units": {job: out.job_shards}})


def test_job_array_partials_merge_to_one_run(tmp_path):
    config, output = ToyConfig(units=10), tmp_path / "toy.pt"
    run_jobs(tmp_path, output, config, 3)
    paths = find_partials(output)
    assert [p.name for p in paths] == [f"toy.pt.shard-{i}-of-3.pt" for i in range(3)]
    merged = merge_partials(paths)
    want = expected(config)
    assert merged.state["count"] == 10 and torch.equal(merged.state["total"], want.total)
    assert merged.header["kind"] == KIND and merged.header["jobs"] == 3
    assert merged.header["output"] == str(output)
    assert sorted(merged.extra["units"]) == [0, 1, 2]  # extras are merged key by key
    assert sorted(s for shards in merged.extra["units"].values() for s in shards) == list(range(10))


def test_merge_goes_through_the_registry(tmp_path, monkeypatch):
    config, output = ToyConfig(units=4), tmp_path / "toy.pt"
    run_jobs(tmp_path, output, config, 2)
    calls = []
    register_merge(KIND, lambda states: calls.append(len(states)) or merge_toy_states(states))
    try:
        merge_partials(find_partials(output))
        assert calls == [2]
        register_merge(KIND, "tests.runs.test_partials:merge_toy_states")  # imported on first use
        assert merge_function(KIND) is merge_toy_states
        monkeypatch.delitem(run_partials.MERGES, KIND)
        with pytest.raises(InputError, match=f"no merge is registered for {KIND} partials"):
            merge_partials(find_partials(output))
    finally:
        register_merge(KIND, merge_toy_states)


def test_mixed_or_incomplete_partials_are_refused(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    run_jobs(tmp_path, a, ToyConfig(units=6, scale=1), 2)
    run_jobs(tmp_path, b, ToyConfig(units=6, scale=2), 2)
    with pytest.raises(RunStateError, match=r"configurations \(differ in: scale\); scale is 2 in b"):
        merge_partials([partial_path(a, 0, 2), partial_path(b, 1, 2)])
    with pytest.raises(InputError, match=r"missing: \[1\], repeated: \[0\]"):
        merge_partials([partial_path(a, 0, 2), partial_path(a, 0, 2)])
    with pytest.raises(InputError, match="no partials"):
        merge_partials([])
    bad = tmp_path / "bad.pt"
    torch.save({"format": "fflayers-scan-partial/1"}, bad)
    with pytest.raises(InputError, match="format fflayers-scan-partial/1, expected fflayers-partial/1"):
        read_partial(bad)
