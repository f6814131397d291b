import random

import numpy as np
import pytest
import torch

from fflayers.core import FflayersError
from fflayers.data.batching import Batch, iter_batches, make_batches, plan_batches

PAD = 1


def random_sequences(n: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 500) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def check_cover(batches: list[Batch], seqs: list[list[int]], pad_id: int = PAD) -> None:
    """Every sequence appears exactly once, recoverable from index + mask, right-padded."""
    seen = []
    for b in batches:
        B, T = b.input_ids.shape
        assert b.input_ids.dtype == torch.long and b.attention_mask.dtype == torch.bool
        assert b.attention_mask.shape == (B, T) and len(b.index) == B == len(b)
        assert T == max(len(seqs[i]) for i in b.index)  # no column of pure padding
        for r, i in enumerate(b.index):
            n = len(seqs[i])
            assert b.input_ids[r, b.attention_mask[r]].tolist() == seqs[i]
            assert b.sequence(r) == seqs[i]
            assert b.attention_mask[r, :n].all() and not b.attention_mask[r, n:].any()  # padding on the right
            assert (b.input_ids[r, n:] == pad_id).all()
        assert b.lengths.tolist() == [len(seqs[i]) for i in b.index]
        seen += b.index
    assert sorted(seen) == list(range(len(seqs)))


def test_cover_budget_and_sorting():
    seqs = random_sequences(200, 40, seed=1)
    budget = 128
    batches = make_batches(seqs, pad_id=PAD, batch_tokens=budget)
    check_cover(batches, seqs)
    for b in batches:
        assert b.input_ids.numel() <= budget
    # longest first, stable for ties (independent stable sort on the negated length)
    order = [i for b in batches for i in b.index]
    assert order == sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    # greedy packing is tight: the next batch's first sequence would not have fitted into the previous batch
    for a in batches[:-1]:
        assert (len(a) + 1) * a.input_ids.shape[1] > budget


def test_ties_keep_input_order():
    seqs = [[5] * 3, [6] * 2, [7] * 3, [8] * 2, [9] * 3]
    batches = make_batches(seqs, pad_id=0, batch_tokens=100)
    assert [i for b in batches for i in b.index] == [0, 2, 4, 1, 3]


def test_max_batch_size():
    seqs = random_sequences(50, 10, seed=2)
    batches = make_batches(seqs, pad_id=PAD, batch_tokens=10_000, max_batch_size=8)
    check_cover(batches, seqs)
    assert all(len(b) <= 8 for b in batches) and len(batches) == 7


def test_unsorted_keeps_input_order_and_budget():
    seqs = random_sequences(60, 30, seed=3)
    batches = make_batches(seqs, pad_id=PAD, batch_tokens=90, sort_by_length=False)
    check_cover(batches, seqs)
    assert [i for b in batches for i in b.index] == list(range(60))
    assert all(b.input_ids.numel() <= 90 or len(b) == 1 for b in batches)


def test_overlong_sequence_gets_its_own_batch():
    seqs = [[2] * 3, [3] * 50, [4] * 4]
    batches = make_batches(seqs, pad_id=0, batch_tokens=16)
    check_cover(batches, seqs, pad_id=0)
    assert batches[0].index == [1] and batches[0].input_ids.shape == (1, 50)
    assert batches[1].index == [2, 0] and batches[1].input_ids.shape == (2, 4)


def test_too_long_error_and_truncate():
    seqs = [[2, 3], list(range(10, 30)), [4]]
    with pytest.raises(FflayersError) as err:
        make_batches(seqs, pad_id=0, max_length=8)
    msg = str(err.value)
    assert "\n" not in msg
    assert "sequence 1" in msg and "20 tokens" in msg and "max_length=8" in msg and "truncate=True" in msg
    batches = make_batches(seqs, pad_id=0, max_length=8, truncate=True)
    rows = {i: b.sequence(r) for b in batches for r, i in enumerate(b.index)}
    assert rows == {0: [2, 3], 1: list(range(10, 18)), 2: [4]}
    assert seqs[1] == list(range(10, 30))  # input untouched


@pytest.mark.parametrize(
    "seqs, match",
    [
        ([], "no sequences"),
        ([[1, 2], []], "sequence 1 is empty"),
        (["some text"], "tokenize the text first"),
        ([[1, 2.5]], "integer token ids"),
        ([torch.tensor([1.0, 2.0])], "integer token ids"),
        ([[True, False]], "integer token ids"),
    ],
)
def test_bad_input(seqs, match):
    with pytest.raises(FflayersError, match=match):
        make_batches(seqs, pad_id=0)


def test_bad_settings():
    with pytest.raises(FflayersError, match="batch_tokens"):
        make_batches([[1]], pad_id=0, batch_tokens=0)
    with pytest.raises(FflayersError, match="max_batch_size"):
        make_batches([[1]], pad_id=0, max_batch_size=0)
    with pytest.raises(FflayersError, match="pad_id"):
        make_batches([[1]], pad_id=None)


def test_tensor_and_numpy_inputs():
    seqs = [torch.tensor([5, 6, 7]), np.array([8, 9], dtype=np.int32), (10,)]
    batches = make_batches(seqs, pad_id=0)
    assert len(batches) == 1
    b = batches[0]
    assert b.index == [0, 1, 2]
    assert b.input_ids.tolist() == [[5, 6, 7], [8, 9, 0], [10, 0, 0]]
    assert b.attention_mask.tolist() == [[True] * 3, [True, True, False], [True, False, False]]


def test_iter_batches_checks_eagerly_and_matches_make_batches():
    with pytest.raises(FflayersError):
        iter_batches([[1], []], pad_id=0)  # raises at call time, before iteration
    seqs = random_sequences(40, 20, seed=4)
    eager = make_batches(seqs, pad_id=PAD, batch_tokens=64)
    lazy = list(iter_batches(seqs, pad_id=PAD, batch_tokens=64))
    assert [b.index for b in lazy] == [b.index for b in eager]
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(lazy, eager, strict=True))


def test_plan_batches_on_lengths():
    assert plan_batches([1, 4, 2, 4], batch_tokens=8) == [[1, 3], [2, 0]]
