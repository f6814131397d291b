"""The accumulator protocol, on a tiny mean accumulator."""

from __future__ import annotations

import itertools

import pytest
import torch

from fflayers.runs import Accumulator, from_state, merge_all, merge_parts, run_units
from tests.runs.toy import KIND, Mean, ToyConfig, ToyTask, expected


def filled(values) -> Mean:
    acc = Mean()
    for v in values:
        acc.add(torch.tensor([float(v), float(v) ** 2]))
    return acc


def test_mean_follows_the_protocol():
    assert isinstance(Mean(), Accumulator)
    assert not isinstance(object(), Accumulator)


def test_merge_all_equals_one_pass_in_any_order():
    chunks = [[1, 2], [3], [4, 5, 6], []]
    whole = filled(range(1, 7))
    for order in itertools.permutations(chunks):
        states = [filled(c).state_dict() for c in order]
        out = merge_all(states, Mean)
        assert out.count == 6 and torch.equal(out.total, whole.total)
    assert out.mean.tolist() == pytest.approx([3.5, 91 / 6])
    empty = merge_all([], Mean)
    assert empty.count == 0 and empty.total is None


def test_state_round_trip_and_merge_parts_leave_the_others_alone():
    a, b = filled([1, 2]), filled([10])
    copy = from_state(Mean, a.state_dict())
    assert copy is not a and copy.count == 2 and torch.equal(copy.total, a.total)
    merged = merge_parts([copy, b])
    assert merged is copy and merged.count == 3 and merged.total.tolist() == [13.0, 105.0]
    assert a.count == 2 and a.total.tolist() == [3.0, 5.0] and b.count == 1  # inputs unchanged
    with pytest.raises(ValueError):
        merge_parts([])


def test_a_run_of_accumulators_equals_the_direct_result(tmp_path):
    config = ToyConfig(units=9)
    out = run_units(ToyTask(config), config, kind=KIND, run_dir=tmp_path / "run", shard_weight=2,
                    progress=False)
    want = expected(config)
    assert out.plan["n_shards"] > 1 and out.result.count == 9 and torch.equal(out.result.total, want.total)


def test_unit_pieces_follow_the_protocol_and_merge_in_unit_order():
    from fflayers.runs import PiecesTask, UnitPieces, merge_piece_states

    def pieces(units):
        out = UnitPieces()
        for u in units:
            out.add(u, f"rows of {u}")
        return out

    assert isinstance(UnitPieces(), Accumulator)
    want = [f"rows of {u}" for u in range(6)]
    for order in itertools.permutations([[4], [0, 5], [2, 1], [3], []]):
        assert merge_all([pieces(c).state_dict() for c in order], UnitPieces).pieces() == want
    states = [pieces([3, 1]).state_dict(), pieces([0, 2]).state_dict()]
    assert merge_piece_states(states) == {"pieces": [[u, f"rows of {u}"] for u in range(4)]}
    task = PiecesTask()
    part = task.merge([pieces([2]), task.from_state(pieces([0]).state_dict())])
    assert part.units() == [0, 2] and task.to_state(part)["pieces"][0] == [0, "rows of 0"]
    assert task.merge([]).pieces() == []
    from fflayers.core import RunStateError

    for old_layout in ([[0, "rows of 0"]], {0: {"record": 1}}):  # the shard states before UnitPieces
        with pytest.raises(RunStateError, match="layout of an earlier fflayers version; remove the run"):
            task.from_state(old_layout)
    with pytest.raises(ValueError, match="unit 2 was added twice"):
        pieces([2]).merge(pieces([2, 3]))
