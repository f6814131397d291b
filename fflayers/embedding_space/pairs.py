"""Exact top-N entries of ``R W C^T`` without building it: token pairs of an attention head's W_QK / W_VO.

For a head, ``R W C^T`` (``R``, ``C``: embedding matrices ``[V, d]``) is a ``V x V`` matrix: 10 GB in fp32 at
V = 50k. :func:`top_pairs` walks it in blocks of rows: ``(R[block] @ W) @ C^T`` is ``[block, V]``; once N
entries are known, only the block's entries at or above the running N-th best score are candidates (one
comparison pass; the filters are checked on those alone), they are merged with the running best N, and the
block is dropped. Peak memory is ``O(block * V + V * d)``, independent of ``V^2``, and the result is exact.
Rows and columns a filter excludes are never computed. For a low-rank ``W = U Vt`` (a head's ``W_V W_O``,
rank ``d_head``), pass ``R @ U``, the identity and ``C @ Vt^T``: ``d / d_head`` times fewer operations.

Ties are broken deterministically: equal scores are ordered by row, then column (smaller first), both within a
block (every entry equal to the block's N-th score is considered, in index order) and across blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fflayers.core import InputError

__all__ = ["PairFilter", "top_pairs", "pair_block_rows"]


@dataclass(frozen=True)
class PairFilter:
    """Which entries may be listed.

    ``rows`` / ``cols``: bool ``[V]`` masks of allowed row / column tokens (None: all). ``exclude_same``: drop
    the diagonal (a token paired with itself). ``groups``: int ``[V]``; entries whose row and column share a
    group are dropped (e.g. tokens that differ only by case and a leading space).
    """

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    exclude_same: bool = False
    groups: torch.Tensor | None = None


#: above this many entries at or over the running threshold, a block takes the full (masked top-N) path
_MAX_CANDIDATES = 1 << 20


def pair_block_rows(n_cols: int, max_elements: int = 1 << 24) -> int:
    """Rows per block so that a block holds at most ``max_elements`` scores (64 MB in fp32 by default)."""
    return max(1, int(max_elements) // max(1, n_cols))


def _block_best(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices of the ``n`` best finite entries of ``scores`` (larger first; ties: smaller index
    first)."""
    flat = scores.reshape(-1)
    finite = torch.isfinite(flat)
    n = min(n, int(finite.sum()))
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    vals, _ = flat.topk(n)
    threshold = vals[-1]
    strict = (flat > threshold).nonzero().squeeze(1)
    ties = (flat == threshold).nonzero().squeeze(1)[: n - strict.numel()]  # ascending index order
    return torch.cat([strict, ties])


def _order(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the best ``n`` candidates: score descending, then row, then column ascending."""
    key = torch.argsort(cols, stable=True)
    key = key[torch.argsort(rows[key], stable=True)]
    key = key[torch.argsort(scores[key], descending=True, stable=True)]
    return key[:n]


def top_pairs(
    R: torch.Tensor,
    W: torch.Tensor,
    C: torch.Tensor,
    n: int,
    largest: bool = True,
    filt: PairFilter | None = None,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``n`` largest (or smallest) entries of ``R @ W @ C.T``: ``(scores, rows, cols)``, best first.

    ``R [Vr, d]``, ``W [d, d']``, ``C [Vc, d']``; computed in float32 (float64 stays float64) on ``W``'s
    device. Fewer than ``n`` results only when fewer entries pass ``filt``.
    """
    Vr, Vc = R.shape[0], C.shape[0]
    if n < 1:
        raise InputError(f"N = {n} must be >= 1")
    if n > Vr * Vc:
        raise InputError(f"N = {n} is larger than the {Vr} x {Vc} = {Vr * Vc} entries; pass a smaller N")
    if R.shape[1] != W.shape[0] or C.shape[1] != W.shape[1]:
        raise InputError(f"shapes do not match: R {tuple(R.shape)}, W {tuple(W.shape)}, C {tuple(C.shape)}")
    filt = filt or PairFilter()
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    device = W.device
    sign = 1.0 if largest else -1.0
    # rows / columns a filter leaves out are never computed: work on the allowed ones (order kept, so the
    # tie order by original index is unchanged) and map back at the end
    row_ids = (torch.arange(Vr, device=device) if filt.rows is None
               else filt.rows.to(device).nonzero().squeeze(1))
    col_ids = (torch.arange(Vc, device=device) if filt.cols is None
               else filt.cols.to(device).nonzero().squeeze(1))
    Wd = W.to(dtype) * sign
    Ct = C.to(device)[col_ids].to(dtype).T
    groups = None if filt.groups is None else filt.groups.to(device)
    col_groups = None if groups is None else groups[col_ids]
    nc = col_ids.numel()
    block = block_rows or pair_block_rows(nc)
    best_s = torch.empty(0, dtype=dtype, device=device)
    best_r = torch.empty(0, dtype=torch.long, device=device)
    best_c = torch.empty(0, dtype=torch.long, device=device)
    def valid(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        ok = torch.ones_like(r, dtype=torch.bool)
        if filt.exclude_same:
            ok &= r != c
        if groups is not None:
            ok &= groups[r] != groups[c]
        return ok

    with torch.no_grad():
        for start in range(0, row_ids.numel(), block):
            rows = row_ids[start : start + block]
            scores = (R.to(device)[rows].to(dtype) @ Wd) @ Ct
            fast = best_s.numel() == n
            if fast:
                # only entries >= the running N-th best can enter; filters are checked on those alone
                r_loc, c_loc = (scores >= best_s[-1]).nonzero(as_tuple=True)
                fast = r_loc.numel() <= _MAX_CANDIDATES
            if fast:
                r, c = rows[r_loc], col_ids[c_loc]
                ok = valid(r, c)
                s, r, c = scores[r_loc[ok], c_loc[ok]], r[ok], c[ok]
            else:
                if filt.exclude_same:
                    scores[rows[:, None] == col_ids[None, :]] = -torch.inf
                if groups is not None:
                    scores[groups[rows][:, None] == col_groups[None, :]] = -torch.inf
                flat = _block_best(scores, n)
                s = scores.reshape(-1)[flat]
                r, c = rows[flat // nc], col_ids[flat % nc]
            cand_s, cand_r, cand_c = torch.cat([best_s, s]), torch.cat([best_r, r]), torch.cat([best_c, c])
            keep = _order(cand_s, cand_r, cand_c, n)
            best_s, best_r, best_c = cand_s[keep], cand_r[keep], cand_c[keep]
    return best_s * sign, best_r, best_c
