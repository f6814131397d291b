"""Blockwise exact top-N pairs against a brute force over the dense matrix (integer-valued inputs: exact
arithmetic, many exact ties, so tie-breaking is checked too)."""

from __future__ import annotations

import pytest
import torch

from fflayers.core import FflayersError
from fflayers.embedding_space.pairs import PairFilter, top_pairs

V, D = 37, 6


def ints(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=g).double()


def brute(R, W, C, n, largest, filt: PairFilter):
    M = R @ W @ C.T
    entries = []
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            if filt.rows is not None and not filt.rows[i]:
                continue
            if filt.cols is not None and not filt.cols[j]:
                continue
            if filt.exclude_same and i == j:
                continue
            if filt.groups is not None and filt.groups[i] == filt.groups[j]:
                continue
            s = float(M[i, j])
            entries.append((-s if largest else s, i, j))
    entries.sort()
    return [(-s if largest else s, i, j) for s, i, j in entries[:n]]


FILTERS = {
    "none": PairFilter(),
    "rows+cols": PairFilter(rows=torch.arange(V) % 3 != 0, cols=torch.arange(V) % 2 == 0),
    "same": PairFilter(exclude_same=True),
    "groups": PairFilter(groups=torch.arange(V) // 4),
    "all": PairFilter(rows=torch.arange(V) % 5 != 1, cols=torch.arange(V) > 3, exclude_same=True,
                      groups=torch.arange(V) % 7),
}


@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize("block", [1, 5, 16, 100])
@pytest.mark.parametrize("largest", [True, False])
def test_equals_brute_force(name, block, largest):
    R, W, C = ints(V, D, seed=1), ints(D, D, seed=2), ints(V, D, seed=3)
    n = 50
    s, r, c = top_pairs(R, W, C, n, largest=largest, filt=FILTERS[name], block_rows=block)
    got = list(zip(s.tolist(), r.tolist(), c.tolist(), strict=True))
    assert got == brute(R, W, C, n, largest, FILTERS[name])


def test_rectangular_and_float32():
    g = torch.Generator().manual_seed(0)
    R, W, C = torch.randn(23, 8, generator=g), torch.randn(8, 5, generator=g), torch.randn(31, 5, generator=g)
    s, r, c = top_pairs(R, W, C, 10, block_rows=7)
    dense = (R.double() @ W.double() @ C.double().T)
    vals, idx = dense.reshape(-1).topk(10)
    assert (r * 31 + c).tolist() == idx.tolist()
    torch.testing.assert_close(s.double(), vals, rtol=1e-5, atol=1e-5)


def test_fewer_entries_than_n_after_filtering():
    R, W, C = ints(4, 3, seed=1), ints(3, 3, seed=2), ints(4, 3, seed=3)
    s, r, c = top_pairs(R, W, C, 16, filt=PairFilter(exclude_same=True))
    assert len(s) == 12 and all(i != j for i, j in zip(r.tolist(), c.tolist(), strict=True))


def test_bad_n():
    R, W, C = ints(4, 3, seed=1), ints(3, 3, seed=2), ints(4, 3, seed=3)
    with pytest.raises(FflayersError, match="larger than the 4 x 4"):
        top_pairs(R, W, C, 17)
    with pytest.raises(FflayersError, match=">= 1"):
        top_pairs(R, W, C, 0)
