"""The fits' passes on fflayers.runs: accumulators with the state protocol, and a merge that folds shard
rows in unit order into exactly the sums of one uninterrupted pass, whatever the grouping and order of the
parts."""

from __future__ import annotations

import random

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.runs import from_state, run_units
from fflayers.shortcuts import GramAccumulator, iter_state_batches, sample_positions
from fflayers.shortcuts.chains import SubmoduleGram, iter_submodule_points
from fflayers.shortcuts.passes import PointsPass, StatesPass, merge_rows_states
from tests.fixtures.hf_models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def adapter() -> HFAdapter:
    return HFAdapter(tiny_model("gpt2"), device="cpu")


@pytest.fixture(scope="module")
def positions(adapter):
    g = torch.Generator().manual_seed(0)
    sents = [torch.randint(1, VOCAB, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
             for _ in range(70)]
    return sample_positions(adapter, sents, seed=0)


def one_pass(adapter, positions, block: int, batch: int) -> GramAccumulator:
    """What the fit did before it ran on fflayers.runs: one accumulator, batches restarting at each block."""
    acc = GramAccumulator(adapter.n_layers + 1, adapter.d_model)
    for start in range(0, len(positions), block):
        for states in iter_state_batches(adapter, positions[start : start + block], batch_size=batch):
            acc.update(states)
    return acc


def test_gram_accumulator_state_protocol():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, 5, generator=g)
    a, b, whole = GramAccumulator(3, 5), GramAccumulator(3, 5), GramAccumulator(3, 5)
    a.add(x[:12])
    b.add(x[12:])
    whole.add(x)
    copy = from_state(lambda: GramAccumulator(3, 5, allocate=False), a.state_dict())
    assert copy.n == 12 and all(torch.equal(p, q) for p, q in zip(copy.blocks, a.blocks, strict=True))
    a.merge(b)
    assert a.n == 30 and b.n == 18
    for p, q in zip(a.blocks, whole.blocks, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    with pytest.raises(FflayersError, match="does not fit"):
        GramAccumulator(3, 4).load_state_dict(a.state_dict())


def test_merge_folds_in_unit_order_bit_for_bit(adapter, positions):
    want = one_pass(adapter, positions, block=9, batch=4)
    task = StatesPass(adapter, positions, block=9, batch_size=4)
    assert task.n_units == 8 and [task.unit_weight(u) for u in range(8)] == [9] * 7 + [7]
    parts = [task.run_units(range(u, u + 1), lambda _n: None) for u in range(task.n_units)]
    for seed in range(3):  # any grouping and order of the parts, through their saved states
        rng = random.Random(seed)
        order = rng.sample(parts, len(parts))
        left = task.merge([task.from_state(task.to_state(p)) for p in order[:5]])
        assert left.acc is None or left.done < task.n_units
        right = task.merge([task.from_state(task.to_state(p)) for p in order[5:]])
        got = task.result(task.merge([task.from_state(task.to_state(right)), left]))
        assert got.n == want.n == len(positions)
        assert all(torch.equal(p, q) for p, q in zip(got.blocks, want.blocks, strict=True))
    with pytest.raises(FflayersError, match="folded 0 of 8"):
        task.result(task.merge(parts[1:3]))


def test_run_units_equals_one_pass_with_a_run_folder(adapter, positions, tmp_path):
    task = StatesPass(adapter, positions, block=16, batch_size=5)
    run = run_units(task, {"test": 1}, kind="shortcut_fit", run_dir=tmp_path / "run", shard_weight=16,
                    progress=False)
    assert run.plan["n_shards"] == 5
    got, want = task.result(run.result), one_pass(adapter, positions, 16, 5)
    assert all(torch.equal(p, q) for p, q in zip(got.blocks, want.blocks, strict=True))
    again = run_units(task, {"test": 1}, kind="shortcut_fit", run_dir=tmp_path / "run", shard_weight=16,
                      progress=False)  # every shard loaded from its file
    assert again.reused == 5 and again.computed_all == 0
    assert all(torch.equal(p, q) for p, q in zip(task.result(again.result).blocks, want.blocks, strict=True))
    states = [task.to_state(task.run_units(range(u, u + 1), lambda _n: None)) for u in (3, 0)]
    merged = merge_rows_states(states)
    assert merged["units"] == [0, 3] and torch.equal(merged["rows"][1], states[0]["rows"][0])


def test_points_pass_equals_one_submodule_pass(adapter, positions):
    acc = SubmoduleGram(adapter, [1, 2])
    for pts in iter_submodule_points(adapter, positions, [1, 2], batch_size=8):
        acc.update(pts)
    task = PointsPass(adapter, positions, [2, 1], block=20, batch_size=8)
    assert task.block == 24 and task.n_units == 3  # blocks of whole batches: the batches of one pass
    parts = [task.run_units(range(u, u + 1), lambda _n: None) for u in reversed(range(task.n_units))]
    got = task.result(task.merge(parts))
    assert got.n == acc.n == len(positions)
    for key in acc.gram:
        assert torch.equal(got.gram[key], acc.gram[key])
    for key in acc.cross:
        assert torch.equal(got.cross[key], acc.cross[key])
    maps = got.fit(1e-6)
    assert len(maps) == 2 * 6 and maps[1, "mlp"].shape == (adapter.d_model, adapter.d_model)
    restored = from_state(lambda: SubmoduleGram(adapter, [1, 2], allocate=False), got.state_dict())
    restored.merge(acc)  # restored holds got's tensors: got is not used below
    assert restored.n == 2 * acc.n
    torch.testing.assert_close(restored.cross[2, "mlp"], 2 * acc.cross[2, "mlp"])
