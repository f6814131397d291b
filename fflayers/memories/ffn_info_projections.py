"""Predictions through the output head for :mod:`fflayers.memories.ffn_info`: of vectors and of sub-updates.

:func:`head_stats` gives, for rows ``h``, the top-1 of ``P(h)`` and the rank and probability of per-row target
tokens. :func:`subupdates` gives ``argmax P(m_i v_i)`` and the rank of a target under it for every (sentence,
value) pair, in batched chunks through the head, or exactly from per-value logits through a
:class:`~fflayers.memories.ffn_info_heads.ScaledHead` (:func:`scaled_subupdates`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fflayers.backends.base import LMAdapter
from fflayers.memories.agreement import count_greater
from fflayers.memories.ffn_info_heads import ScaledHead
from fflayers.memories.value_projections import full_precision

__all__ = ["head_stats", "scaled_subupdates", "subupdates"]


def head_stats(adapter: LMAdapter, vecs: torch.Tensor, targets: Sequence[torch.Tensor],
               chunk: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Top-1, its prob, and (rank, prob) of each per-row target, for rows of ``vecs [N, d]``.

    Returns ``(top1, top1_prob, ranks, probs)`` on the CPU, ``ranks`` / ``probs`` one tensor per target;
    ``chunk`` rows are projected at a time.
    """
    n = vecs.shape[0]
    top = torch.empty(n, dtype=torch.long)
    top_p = torch.empty(n, dtype=torch.float64)
    ranks = [torch.empty(n, dtype=torch.long) for _ in targets]
    probs = [torch.empty(n, dtype=torch.float64) for _ in targets]
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        lp = full_precision(adapter.project(vecs[sl], chunk_size=sl.stop - sl.start))
        best, arg = lp.max(1)
        top[sl], top_p[sl] = arg.cpu(), best.exp().double().cpu()
        for k, t in enumerate(targets):
            tl = lp.gather(1, t[sl].to(lp.device)[:, None])
            ranks[k][sl] = (lp > tl).sum(1).cpu()
            probs[k][sl] = tl[:, 0].exp().double().cpu()
    return top, top_p, ranks, probs


def _pair_lse(z: torch.Tensor, mc: torch.Tensor, mask: torch.Tensor, max_elements: int) -> torch.Tensor:
    """``logsumexp_j(mc[i, s] * z[i, j])`` for the pairs ``(i, s)`` where ``mask`` holds (NaN elsewhere), in
    tiles of at most ``max_elements`` terms."""
    out = torch.full(mc.shape, float("nan"), dtype=z.dtype, device=z.device)
    ii, ss = mask.nonzero(as_tuple=True)
    tile = max(1, max_elements // max(1, z.shape[1]))
    for start in range(0, len(ii), tile):
        i, s = ii[start : start + tile], ss[start : start + tile]
        out[i, s] = torch.logsumexp(mc[i, s, None] * z[i], dim=-1)
    return out


def _pair_count(z: torch.Tensor, mc: torch.Tensor, mask: torch.Tensor, thr: torch.Tensor,
                max_elements: int) -> torch.Tensor:
    """``#{j : z[i, j] > thr[i, s]}`` (``<`` where ``mc[i, s] < 0``) for the pairs where ``mask`` holds (0
    elsewhere)."""
    out = torch.zeros(mc.shape, dtype=torch.long, device=z.device)
    ii, ss = mask.nonzero(as_tuple=True)
    tile = max(1, max_elements // max(1, z.shape[1]))
    for start in range(0, len(ii), tile):
        i, s = ii[start : start + tile], ss[start : start + tile]
        rows, t = z[i], thr[i, s, None]
        out[i, s] = torch.where(mc[i, s] > 0, (rows > t).sum(1), (rows < t).sum(1))
    return out


def scaled_subupdates(head: ScaledHead, values: torch.Tensor, m: torch.Tensor, targets: torch.Tensor | None,
                      max_elements: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`subupdates` through a :class:`ScaledHead`: each value's group logits are computed once per
    block.

    For token j of group g, ``log P(m v)_j = m z_g[j] + m a_g - lse_g - LSE_head`` (``a_g``: the cluster's
    logit in the head, ``lse_g = logsumexp(m z_g)``; both 0 for the shortlist). The top-1 is the best group's
    extreme token (argmax of ``z_g`` for m > 0, argmin for m < 0), and ``lp_j > lp_t`` iff ``z_g[j] > z_t +
    (a_t - a_g) - (lse_t - lse_g) / m`` (``<`` for m < 0): counted for all pairs at once in the shortlist
    (bucketing against the sentences' thresholds) and pair by pair in a tail cluster, unless the bounds below
    decide it (0 or all). ``lse_g`` lies in ``[max(m e_g, m mean(z_g) + log n_g), m e_g + log n_g]``
    (``m e_g = max_j m z_g[j]``); it is computed exactly (O(n_g)) only for the (value, sentence) pairs that
    these bounds leave undecided.
    """
    S, n = m.shape
    top = torch.full((S, n), -1, dtype=torch.long)
    rank = torch.full((S, n), -1, dtype=torch.long) if targets is not None else None
    cut = head.cutoff
    c0, K = cut[0], head.n_tails
    chunk = max(1, max_elements // cut[-1])
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        z = head.logits(values[sl])
        groups = [z[0][:, :c0], *z[1:]]
        offsets = [0, *cut[:-1]]
        mc = m[:, sl].T.to(z[0].device, z[0].dtype)  # [c, S]
        pos, nz = mc > 0, mc != 0
        zeros = torch.zeros_like(mc)
        scale = max(float(zg.abs().max()) for zg in groups) if groups[0].numel() else 1.0
        tol = 1e-4 + 1e-5 * mc.abs() * scale  # decisions from bounds keep this margin against rounding
        e, f, arg_e = [], [], []
        for g, zg in enumerate(groups):
            mx, imx = zg.max(1, keepdim=True)
            mn, imn = zg.min(1, keepdim=True)
            e.append(torch.where(pos, mx, mn))  # m * e = max_j m z_g[j]
            f.append(torch.where(pos, mn, mx))  # m * f = min_j m z_g[j]
            arg_e.append(torch.where(pos, imx, imn) + offsets[g])
        a = [zeros] + [z[0][:, c0 + k, None] for k in range(K)]
        logn = [0.0] + [float(np.log(zg.shape[1])) for zg in groups[1:]]
        lse_lo = [zeros] + [torch.maximum(mc * e[g], mc * groups[g].mean(1, keepdim=True) + logn[g])
                            for g in range(1, K + 1)]
        lse_hi = [zeros] + [mc * e[g] + logn[g] for g in range(1, K + 1)]
        need = [None] + [torch.zeros_like(nz) for _ in range(K)]
        ambiguous = torch.zeros_like(nz)
        if K:  # which group holds the top-1: decided by the bounds unless the intervals overlap
            lo = torch.stack([mc * e[0]] + [mc * (a[g] + e[g]) - lse_hi[g] for g in range(1, K + 1)], dim=-1)
            hi = torch.stack([mc * e[0]] + [mc * (a[g] + e[g]) - lse_lo[g] for g in range(1, K + 1)], dim=-1)
            w_lo = lo.argmax(-1)
            others = hi.scatter(-1, w_lo[..., None], float("-inf")).amax(-1)
            ambiguous = nz & ~(lo.gather(-1, w_lo[..., None])[..., 0] - tol > others)
            for g in range(1, K + 1):
                need[g] |= ambiguous
        if targets is not None:
            t = targets.to(mc.device)
            # 0 = shortlist
            tgroup = torch.bucketize(t, torch.as_tensor(cut[:-1], device=t.device), right=True)
            tail_t = (tgroup > 0)[None].expand_as(mc)
            zero_cnt, all_cnt = [None] * (K + 1), [None] * (K + 1)
            z_short = groups[0][:, t.clamp(max=c0 - 1)]
            for g in range(1, K + 1):
                need[g] |= nz & tail_t  # a tail target needs every cluster's exact lse
                r = mc * (z_short - a[g])  # tail token j beats a shortlist target iff m z_g[j] - lse_g > r
                zero_cnt[g] = ~tail_t & (mc * e[g] - lse_lo[g] + tol <= r)
                all_cnt[g] = ~tail_t & (mc * f[g] - lse_hi[g] - tol > r)
                need[g] |= nz & ~tail_t & ~zero_cnt[g] & ~all_cnt[g]
        lse = [zeros] + [_pair_lse(groups[g], mc, need[g], max_elements) for g in range(1, K + 1)]
        w = torch.zeros_like(mc, dtype=torch.long)
        if K:
            w = w_lo
            if ambiguous.any():
                exact = torch.stack([mc * e[0]] + [mc * (a[g] + e[g]) - lse[g] for g in range(1, K + 1)],
                                    dim=-1)
                w = torch.where(ambiguous, exact.nan_to_num(nan=float("-inf")).argmax(-1), w_lo)
        best = torch.stack(arg_e).expand(-1, -1, mc.shape[1]).gather(0, w[None])[0].masked_fill(~nz, -1)
        top[:, sl] = best.T.cpu()
        if targets is None:
            continue
        z_t, a_t, lse_t = zeros.clone(), zeros.clone(), zeros.clone()
        for g, zg in enumerate(groups):
            sel = (tgroup == g)[None].expand_as(mc)
            z_t = torch.where(sel, zg[:, (t - offsets[g]).clamp(0, zg.shape[1] - 1)], z_t)
            a_t = torch.where(sel, a[g].expand_as(mc), a_t)
            lse_t = torch.where(sel, lse[g], lse_t)
        safe_m = torch.where(nz, mc, torch.ones_like(mc))
        # shortlist: every pair, by bucketing the shortlist logits among the sentences' thresholds
        thr = torch.where(nz, z_t + (a_t - lse_t / safe_m), zeros)  # = z_t exactly for shortlist targets
        thr = torch.where(torch.isfinite(thr), thr, zeros)
        # z < thr  <=>  not z > nextafter(thr, -inf): one bucketing pass serves both signs of m
        below = torch.nextafter(thr, torch.full_like(thr, float("-inf")))
        greater = count_greater(groups[0], torch.where(pos, thr, below))
        counts = torch.where(pos, greater, groups[0].shape[1] - greater)
        # tail clusters: decided by the bounds (0 or all of the cluster), else counted against the exact
        # threshold
        for g in range(1, K + 1):
            n_g = groups[g].shape[1]
            counts += torch.where(all_cnt[g], torch.full_like(counts, n_g), torch.zeros_like(counts))
            todo = nz & ~zero_cnt[g] & ~all_cnt[g]
            thr = z_t + ((a_t - a[g]) - (lse_t - lse[g]) / safe_m)
            counts += _pair_count(groups[g], mc, todo, thr, max_elements)
        rank[:, sl] = counts.masked_fill(~nz, -1).T.cpu()
    return top, rank


def subupdates(adapter: LMAdapter, values: torch.Tensor, m: torch.Tensor, targets: torch.Tensor | None,
               head: ScaledHead | None, max_elements: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``argmax P(m[s, i] v_i)`` and (optionally) the rank of ``targets[s]`` under it: ``[S, n]`` each; -1
    where m = 0.

    ``values [n, d]``, ``m [S, n]``; through ``head`` when given (:func:`scaled_subupdates`), else every
    ``m[s, i] v_i`` goes through ``adapter.project`` in chunks of ``max_elements`` log-probs.
    """
    if head is not None:
        return scaled_subupdates(head, values, m, targets, max_elements)
    S, n = m.shape
    top = torch.full((S, n), -1, dtype=torch.long)
    rank = torch.full((S, n), -1, dtype=torch.long) if targets is not None else None
    chunk = max(1, max_elements // adapter.vocab_size)
    flat_m = m.reshape(-1)
    for start in range(0, S * n, chunk):
        idx = torch.arange(start, min(S * n, start + chunk), device=m.device)
        s, i = idx // n, idx % n
        vecs = flat_m[idx, None].to(values.dtype) * values[i]
        lp = full_precision(adapter.project(vecs, chunk_size=len(idx)))
        zero = (flat_m[idx] == 0).cpu()
        top.view(-1)[start : start + len(idx)] = lp.argmax(1).cpu().masked_fill(zero, -1)
        if targets is not None:
            tl = lp.gather(1, targets.to(lp.device)[s.to(lp.device), None])
            rank.view(-1)[start : start + len(idx)] = (lp > tl).sum(1).cpu().masked_fill(zero, -1)
    return top, rank
