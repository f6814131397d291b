"""StreamingTopK against a brute-force sort of all candidates."""

from __future__ import annotations

import random

import pytest
import torch

from fflayers.core import FflayersError
from fflayers.memories.topk import StreamingTopK, decode, encode


def brute_topk(values: torch.Tensor, positions: torch.Tensor, k: int) -> list[list[tuple[float, int, int]]]:
    """Per key: positive candidates sorted by (value desc, sentence id asc), first k."""
    out = []
    for key in range(values.shape[0]):
        cands = [(float(values[key, s]), s, int(positions[key, s])) for s in range(values.shape[1])
                 if values[key, s] > 0]
        cands.sort(key=lambda c: (-c[0], c[1]))
        out.append(cands[:k])
    return out


def as_lists(tk: StreamingTopK) -> list[list[tuple[float, int, int]]]:
    out = []
    for key in range(tk.n_keys):
        row = [(float(v), int(s), int(p))
               for v, s, p in zip(tk.values[key], tk.sentence_ids[key], tk.positions[key], strict=True)
               if s >= 0]
        out.append(row)
    return out


def feed(tk: StreamingTopK, values: torch.Tensor, positions: torch.Tensor, order: list[int],
         batch: int) -> None:
    for i in range(0, len(order), batch):
        ids = order[i : i + batch]
        tk.update(values[:, ids], positions[:, ids], torch.tensor(ids))


def random_candidates(n_keys: int, n_sent: int, seed: int, tie_levels: int | None = None):
    g = torch.Generator().manual_seed(seed)
    if tie_levels is None:
        values = torch.randn(n_keys, n_sent, generator=g)
    else:  # few distinct values: many exact ties
        values = torch.randint(-2, tie_levels, (n_keys, n_sent), generator=g).float() * 0.5
    positions = torch.randint(0, 30, (n_keys, n_sent), generator=g)
    return values, positions


@pytest.mark.parametrize("batch", [1, 3, 16, 200])
@pytest.mark.parametrize("tie_levels", [None, 3])
def test_streaming_equals_brute_force(batch, tie_levels):
    values, positions = random_candidates(9, 120, seed=batch, tie_levels=tie_levels)
    order = list(range(120))
    random.Random(batch).shuffle(order)  # sentences arrive in any order
    tk = StreamingTopK(9, 7)
    feed(tk, values, positions, order, batch)
    assert as_lists(tk) == brute_topk(values, positions, 7)


def test_ties_go_to_smaller_sentence_id():
    tk = StreamingTopK(2, 3)
    for sid in [9, 4, 7, 1, 8]:  # equal values, arriving in scrambled order
        tk.update(torch.tensor([[2.0], [0.5]]), torch.tensor([[sid], [0]]), torch.tensor([sid]))
    assert tk.sentence_ids.tolist() == [[1, 4, 7], [1, 4, 7]]
    assert tk.positions[0].tolist() == [1, 4, 7]
    tk.update(torch.tensor([[2.5], [0.5]]), torch.tensor([[0], [0]]), torch.tensor([20]))
    assert tk.sentence_ids.tolist() == [[20, 1, 4], [1, 4, 7]]


def test_only_positive_activations_enter():
    tk = StreamingTopK(3, 4)
    vals = torch.tensor([[0.0, -1.0, float("nan"), -float("inf")],
                         [1e-30, 0.0, -0.0, 3.0],
                         [-5.0, -4.0, -3.0, -2.0]])
    tk.update(vals, torch.zeros(3, 4, dtype=torch.long), torch.arange(4))
    assert tk.counts().tolist() == [0, 2, 0]
    assert tk.sentence_ids[1].tolist() == [3, 0, -1, -1]
    assert tk.values[0].tolist() == [float("-inf")] * 4
    assert tk.positions[2].tolist() == [-1] * 4


def test_merge_of_shards_equals_single_stream():
    values, positions = random_candidates(5, 90, seed=1, tie_levels=4)
    whole = StreamingTopK(5, 6)
    feed(whole, values, positions, list(range(90)), 10)
    parts = []
    for shard in (range(0, 30), range(30, 70), range(70, 90)):
        tk = StreamingTopK(5, 6)
        feed(tk, values, positions, list(shard), 7)
        parts.append(tk)
    merged = parts[2].merge(parts[0]).merge(parts[1])  # any order
    assert torch.equal(merged.values, whole.values)
    assert torch.equal(merged.sentence_ids, whole.sentence_ids)
    assert torch.equal(merged.positions, whole.positions)
    assert as_lists(whole) == brute_topk(values, positions, 6)


def test_state_dict_roundtrip_and_resume():
    values, positions = random_candidates(4, 50, seed=2)
    tk = StreamingTopK(4, 5)
    feed(tk, values, positions, list(range(25)), 5)
    restored = StreamingTopK.from_state_dict(tk.state_dict())
    feed(restored, values, positions, list(range(25, 50)), 5)
    assert as_lists(restored) == brute_topk(values, positions, 5)
    with pytest.raises(FflayersError):
        StreamingTopK(4, 6).load_state_dict(tk.state_dict())


def test_composite_keys_order_and_round_trip():
    g = torch.Generator().manual_seed(0)
    mags = 10.0 ** torch.randint(-40, 38, (3000,), generator=g).float()
    values = torch.cat([torch.rand(3000, generator=g) * mags,
                        torch.tensor([1e-45, 3.4e38, float("inf"), 0.5, 0.5])])
    ids = torch.cat([torch.randint(0, 2**32 - 1, (3000,), generator=g),
                     torch.tensor([0, 5, 2**32 - 2, 7, 3])])
    keys = encode(values, ids)
    back_values, back_ids = decode(keys)
    assert torch.equal(back_values, values) and torch.equal(back_ids, ids)
    i, j = torch.randint(0, len(values), (2, 50000), generator=g)
    before = (values[i] > values[j]) | ((values[i] == values[j]) & (ids[i] < ids[j]))
    assert torch.equal(keys[i] > keys[j], before)
    empty_values, empty_ids = decode(encode(torch.tensor([0.0, -1.0, float("nan")]), torch.tensor([1, 2, 3])))
    assert empty_values.tolist() == [float("-inf")] * 3 and empty_ids.tolist() == [-1] * 3


def test_bad_shapes_and_arguments():
    tk = StreamingTopK(3, 2)
    with pytest.raises(FflayersError):
        tk.update(torch.ones(2, 4), torch.zeros(2, 4, dtype=torch.long), torch.arange(4))
    with pytest.raises(FflayersError):
        tk.update(torch.ones(3, 4), torch.zeros(3, 4, dtype=torch.long), torch.arange(3))
    with pytest.raises(FflayersError):
        StreamingTopK(3, 0)
    with pytest.raises(FflayersError):
        tk.merge(StreamingTopK(3, 5))
