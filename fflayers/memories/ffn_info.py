"""Layer and value predictions at one random position per sentence (``--extract_ffn_info``, modes ``layer``/``dim``).

Notation, for layer ``l`` at the chosen position: ``r`` is the residual the FFN update is added to, ``m`` the
coefficients (``mlp_coef``, the input of the FFN's output matrix), ``v_i`` the values, ``y = sum_i m_i v_i + b``
the FFN output (``mlp_out``), and ``P(h) = adapter.project(h)`` the model's own output head (final norm where
the model has one, adaptive softmax in eval mode).

* Pre-LN sequential blocks (GPT-2, GPT-Neo, Llama, fairseq ``normalize_before``): ``r = resid_pre + attn_out``,
  the stream entering the FFN's LayerNorm; ``r + y`` is the layer output.
* Parallel blocks (GPT-J, GPT-NeoX): ``r = resid_pre + attn_out`` as well: what the FFN output is added to,
  so that ``r + y`` is the layer output (the FFN itself reads ``LN(resid_pre)``).
* Post-LN blocks (fairseq without ``normalize_before``): ``r`` is the FFN input (the attention sublayer's
  output after its LayerNorm) and ``r + y`` is the sum *before* the block's closing LayerNorm.

Positions: sentence ``k`` (token ids, BOS first where the model uses one) gets one position ``t`` drawn
uniformly from ``0 .. n_k - 2`` (``n_k`` = its length, capped at the model's maximum), with
``numpy.random.default_rng(seed)`` drawing one number per sentence in input order, so the choice does not depend on
batching. The hidden state at ``t`` predicts token ``t + 1`` (``next_token``). Sentences shorter than 2 tokens
have no such position and get no rows. The model's *final top-1* is the argmax of ``P`` of the last block's
output at ``t``. Only the prefix ``0..t`` is fed to the model (causal LMs: later tokens cannot change position t).

Both modes return one row per ``(sentence, layer)``, sorted by sentence then layer; ranks count the tokens
with a strictly larger probability (0 = top-1); probabilities are ``exp`` of the head's log-probs.

``layer`` mode columns: ``sentence``, ``position``, ``next_token``, ``layer``, ``final_top1``, ``final_top1_prob``;
``layer_top1``/``layer_top1_prob`` (``P(r + y)``), ``residual_top1``/``residual_top1_prob`` (``P(r)``),
``ffn_top1``/``ffn_top1_prob`` (``P(y)``); ``residual_final_rank``/``residual_final_prob`` and
``ffn_final_rank``/``ffn_final_prob`` (rank and probability of the final top-1 under ``P(r)`` / ``P(y)``);
``ffn_rank_of_residual_top1`` (rank of ``argmax P(r)`` under ``P(y)``); ``top1_changed``
(``argmax P(r) != argmax P(r + y)``); ``memories_agreeing`` (how many sub-updates ``m_i v_i`` with ``m_i != 0``
have the top-1 of ``P(r + y)``); ``active_memories`` (``#{m_i > 0}``); ``residual_norm`` (``||r||``) and
``residual_norm_rank`` (``#{i : |m_i| ||v_i|| > ||r||}``, 0 = the residual outweighs every single memory).

``dim`` mode columns: ``sentence``, ``position``, ``next_token``, ``layer``, ``final_top1``, ``residual_top1``,
``residual_final_rank``, and three numpy-array columns over the selected dims (``df.attrs["dims"]``, default
all): ``coefficients`` (``m_i ||v_i||``, float32), ``value_top1`` (``argmax P(m_i v_i)``) and
``value_final_rank`` (rank of the final top-1 under ``P(m_i v_i)``). A zero coefficient makes ``m_i v_i`` the zero
vector, whose projection says nothing about the value: there ``value_top1`` and ``value_final_rank`` are -1
(only ReLU models have exact zeros). This wide layout keeps 1000 sentences of the 16-layer, 4096-dim WikiText-103
model at ~0.8 GB, where a long table (one row per value) would need tens of GB.

``df.attrs`` records ``mode``, ``dims``, ``d_ff``, ``seed``, ``layers``, ``residual`` (which definition of ``r`` was
used) and ``head_shortcut``; :func:`ffn_info_by_layer` summarises a layer-mode table per layer.

Speed: the model runs once per batch of sentences; activations are gathered at the chosen positions by hooks
(``resid_pre``, ``attn_out``, ``mlp_coef``, ``mlp_out``). Sub-update predictions ``P(m_i v_i)`` are computed for all
sentences of a block and all values of a layer in batched chunks (``max_chunk_elements`` log-probs at a time).
Exact shortcuts (:func:`scaled_head`, verified numerically against ``adapter.project`` before use):

* homogeneous head (``logits(c h) = c logits(h)``: a bias-free linear output layer and no final norm, e.g.
  fairseq's plain ``transformer_lm``): ``log P(m v) = log_softmax(m log P(v))``. Each value is projected once per
  block; ``argmax P(m v)`` is ``argmax P(v)`` (``m > 0``) or ``argmin P(v)`` (``m < 0``) and ranks are counts of
  larger (smaller) log-probs of ``P(v)``: no per-sentence work over the vocabulary at all.
* fairseq adaptive softmax without a final norm (the WikiText-103 model): head and tail logits are linear in ``h``,
  so they are computed once per value and block; per (value, sentence) pair no matrix product is needed, only the
  tail clusters' ``logsumexp(m z)``, and only where cheap bounds on it leave the top-1 or a rank count undecided
  (see :func:`_scaled_subupdates`).

* sign-invariant head (RMSNorm without bias followed by a bias-free linear head: Llama-style models such as
  SmolLM2): ``P(m v)`` orders tokens as ``sign(m) log P(v)``, and sub-update top-1s and ranks need nothing more,
  so the linear shortcut above applies to them (:func:`sign_invariant_head`).

Other heads with a final norm (GPT-2 and GPT-NeoX's LayerNorm with bias, fairseq pre-LN with a final LayerNorm) use the general path: every
``m_i v_i`` goes through the head, in batched chunks. Results agree with the general path up to floating-point
rounding at near-ties.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from fflayers.backends.base import AdapterError, LMAdapter
from fflayers.hooks import hooked
from fflayers.memories.agreement import count_greater
from fflayers.memories.value_projections import _progress, check_layers, full_precision

__all__ = ["extract_ffn_info", "ffn_info_by_layer", "choose_positions", "homogeneous_head", "scaled_head",
           "ScaledHead", "LAYER_COLUMNS", "DIM_COLUMNS", "FfnInfoScan"]

LAYER_COLUMNS = [
    "sentence", "position", "next_token", "layer", "final_top1", "final_top1_prob",
    "layer_top1", "layer_top1_prob", "residual_top1", "residual_top1_prob", "ffn_top1", "ffn_top1_prob",
    "residual_final_rank", "residual_final_prob", "ffn_final_rank", "ffn_final_prob", "ffn_rank_of_residual_top1",
    "top1_changed", "memories_agreeing", "active_memories", "residual_norm", "residual_norm_rank",
]
DIM_COLUMNS = [
    "sentence", "position", "next_token", "layer", "final_top1", "residual_top1", "residual_final_rank",
    "coefficients", "value_top1", "value_final_rank",
]


def choose_positions(lengths: Sequence[int], seed: int = 0, max_positions: int | None = None) -> np.ndarray:
    """One position per sentence, uniform in ``0 .. n - 2`` (``n`` capped at ``max_positions``); -1 when ``n < 2``."""
    n = np.asarray(lengths, dtype=np.int64)
    if max_positions is not None:
        n = np.minimum(n, int(max_positions))
    u = np.random.default_rng(seed).random(len(n))
    pos = np.floor(u * np.maximum(n - 1, 0)).astype(np.int64)
    pos = np.minimum(pos, np.maximum(n - 2, 0))
    pos[n < 2] = -1
    return pos


def _probe(adapter: LMAdapter, seed: int = 0) -> torch.Tensor:
    """A few values of the last layer and random vectors of a larger norm, on the adapter's device."""
    values = adapter.ffn_values(adapter.n_layers - 1).detach()[:4].float().cpu()
    gen = torch.Generator().manual_seed(seed)
    scale = float(values.norm(dim=1).mean()) if values.numel() else 1.0
    rand = torch.randn(4, adapter.d_model, generator=gen)
    rand = rand / rand.norm(dim=1, keepdim=True) * max(scale, 1e-3) * 4.0
    return torch.cat([values, rand]).to(adapter.device, adapter.dtype)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    if got.shape != want.shape or not torch.isfinite(got).all() or not torch.isfinite(want).all():
        return False
    return bool((got - want).abs().max() <= 1e-3 * (1.0 + float(want.abs().max())))


@torch.no_grad()
def homogeneous_head(adapter: LMAdapter, seed: int = 0) -> bool:
    """True when ``P(c h) = softmax(c log P(h))`` holds (a head whose logits are linear in ``h`` without bias and
    with no final norm), checked on a few values and random vectors at scales 2.5 and -0.6."""
    probe = _probe(adapter, seed)
    lp = full_precision(adapter.project(probe))
    return all(_close(full_precision(adapter.project(probe * c)), torch.log_softmax(lp * c, dim=-1))
               for c in (2.5, -0.6))


class ScaledHead:
    """An output head whose log-probs of ``c h`` follow exactly from per-group logits of ``h``.

    ``logits(h)`` returns group logits, each linear in ``h`` without bias: the head group (shortlist tokens
    ``0 .. cutoff[0] - 1`` followed by one logit per tail cluster) and one group per tail cluster (tokens
    ``cutoff[k] .. cutoff[k+1] - 1``). ``log P(c h)`` is the two-level softmax of the scaled groups (fairseq's adaptive
    softmax); a plain homogeneous head is the one-group case (``cutoff = [V]``).
    """

    def __init__(self, logits_fn, cutoff: Sequence[int], kind: str) -> None:
        self.logits_fn = logits_fn
        self.cutoff = [int(c) for c in cutoff]
        self.kind = kind

    @property
    def n_tails(self) -> int:
        return len(self.cutoff) - 1

    def logits(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [full_precision(z) for z in self.logits_fn(h)]

    def compose(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        """Full log-probs ``[N, V]`` from group logits."""
        head = torch.log_softmax(z[0], dim=-1)
        c0 = self.cutoff[0]
        parts = [head[:, :c0]]
        parts += [torch.log_softmax(z[k + 1], dim=-1) + head[:, c0 + k, None] for k in range(self.n_tails)]
        return torch.cat(parts, dim=1)


def _adaptive_head(adapter: LMAdapter) -> ScaledHead | None:
    """fairseq adaptive softmax without a final LayerNorm (``decoder.adaptive_softmax``: head, tail, cutoff)."""
    dec = getattr(adapter, "decoder", None)
    asm = getattr(dec, "adaptive_softmax", None)
    if asm is None or getattr(dec, "layer_norm", None) is not None:
        return None
    if not all(hasattr(asm, a) for a in ("head", "tail", "cutoff")):
        return None
    proj = getattr(dec, "project_out_dim", None)
    if proj is not None and getattr(proj, "bias", None) is not None:
        return None

    def logits(h: torch.Tensor) -> list[torch.Tensor]:
        x = proj(h) if proj is not None else h
        return [asm.head(x), *(tail(x) for tail in asm.tail)]

    cutoff = list(asm.cutoff)
    if cutoff[-1] != adapter.vocab_size:
        return None
    return ScaledHead(logits, cutoff, "adaptive")


@torch.no_grad()
def scaled_head(adapter: LMAdapter, seed: int = 0) -> ScaledHead | None:
    """The exact shortcut head of ``adapter`` (adaptive softmax or a homogeneous head), or None.

    Every candidate is verified numerically against ``adapter.project`` on probe vectors at several scales.
    """
    head = _adaptive_head(adapter)
    if head is not None:
        probe = _probe(adapter, seed)
        try:
            z = head.logits(probe)
            ok = len(z) == head.n_tails + 1 and all(
                _close(head.compose(head.logits(probe * c)), full_precision(adapter.project(probe * c)))
                and _close(head.compose([zg * c for zg in z]), full_precision(adapter.project(probe * c)))
                for c in (1.0, 2.5, -0.6))
        except (RuntimeError, TypeError, ValueError, AttributeError):
            ok = False
        if ok:
            return head
    def project(h: torch.Tensor) -> list[torch.Tensor]:
        return [adapter.project(h, chunk_size=max(1, h.shape[0]))]

    if homogeneous_head(adapter, seed):
        return ScaledHead(project, [adapter.vocab_size], "linear")
    if sign_invariant_head(adapter, seed):
        return ScaledHead(project, [adapter.vocab_size], "sign-invariant")
    return None


@torch.no_grad()
def sign_invariant_head(adapter: LMAdapter, seed: int = 0) -> bool:
    """True when ``log P(c h)`` is, up to a per-row constant, ``s * sign(c) * log P(h)`` with ``s > 0``.

    Then ``P(c h)`` orders tokens as ``sign(c) log P(h)`` for every ``c != 0``. This holds exactly for a
    scale-invariant final norm without bias or centring (RMSNorm: ``norm(c h) = s(c) norm(h)``, ``s`` of the sign
    of ``c``) followed by a bias-free linear head (Llama-style models). Sub-update top-1s and ranks depend only on
    that order, so the linear shortcut applies to them. Checked on probe vectors at scales 3, 0.02, -0.7 and -5.
    """
    probe = _probe(adapter, seed)
    base = full_precision(adapter.project(probe))
    base = base - base.mean(1, keepdim=True)
    for c in (3.0, 0.02, -0.7, -5.0):
        got = full_precision(adapter.project(probe * c))
        if not torch.isfinite(got).all():
            return False
        got = got - got.mean(1, keepdim=True)
        want = base if c > 0 else -base
        s = (got * want).sum(1, keepdim=True) / (want * want).sum(1, keepdim=True).clamp_min(1e-30)
        if (s <= 0).any() or not _close(got, s * want):
            return False
    return True


def _is_post_ln(adapter: LMAdapter) -> bool:
    post = getattr(adapter, "post_ln", None)
    if isinstance(post, bool):
        return post
    before = getattr(adapter, "normalize_before", None)
    return isinstance(before, bool) and not before


def _gather_forward(adapter: LMAdapter, batch, layers: list[int], post_ln: bool) -> dict:
    """One forward pass; activations at each row's last real token: ``{name: [L', B, .]}`` plus ``final [B, d]``."""
    ids, mask = batch.input_ids.to(adapter.device), batch.attention_mask.to(adapter.device)
    pos = mask.sum(1) - 1
    rows = torch.arange(ids.shape[0], device=adapter.device)
    store: dict = {}

    def saver(key):
        def fn(x: torch.Tensor):
            store[key] = x[rows, pos].detach().to(adapter.dtype)  # autocast: back to the model's dtype
            return None

        return fn

    # post-LN: r = the FFN input (mlp_in); otherwise the stream entering the FFN's norm
    points = ("mlp_in", "mlp_coef", "mlp_out") if post_ln else ("resid_pre", "attn_out", "mlp_coef", "mlp_out")
    with hooked(adapter, [(p, layer, saver((p, layer))) for p in points for layer in layers]):
        h = adapter.run(ids, mask)
    if h is None:
        raise AdapterError("the forward pass stopped early; remove stop_early hooks before extracting ffn info")

    def stack(name):
        return torch.stack([store[name, layer] for layer in layers])

    r = stack("mlp_in") if post_ln else stack("resid_pre") + stack("attn_out")
    return {"final": h[rows, pos].detach().to(adapter.dtype), "r": r, "y": stack("mlp_out"), "m": stack("mlp_coef")}


def _stats(adapter: LMAdapter, vecs: torch.Tensor, targets: Sequence[torch.Tensor], chunk: int):
    """Top-1, its prob, and (rank, prob) of each per-row target, for rows of ``vecs [N, d]``."""
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
    """``logsumexp_j(mc[i, s] * z[i, j])`` for the pairs ``(i, s)`` where ``mask`` holds (NaN elsewhere), in tiles
    of at most ``max_elements`` terms."""
    out = torch.full(mc.shape, float("nan"), dtype=z.dtype, device=z.device)
    ii, ss = mask.nonzero(as_tuple=True)
    tile = max(1, max_elements // max(1, z.shape[1]))
    for start in range(0, len(ii), tile):
        i, s = ii[start : start + tile], ss[start : start + tile]
        out[i, s] = torch.logsumexp(mc[i, s, None] * z[i], dim=-1)
    return out


def _pair_count(z: torch.Tensor, mc: torch.Tensor, mask: torch.Tensor, thr: torch.Tensor,
                max_elements: int) -> torch.Tensor:
    """``#{j : z[i, j] > thr[i, s]}`` (``<`` where ``mc[i, s] < 0``) for the pairs where ``mask`` holds (0 elsewhere)."""
    out = torch.zeros(mc.shape, dtype=torch.long, device=z.device)
    ii, ss = mask.nonzero(as_tuple=True)
    tile = max(1, max_elements // max(1, z.shape[1]))
    for start in range(0, len(ii), tile):
        i, s = ii[start : start + tile], ss[start : start + tile]
        rows, t = z[i], thr[i, s, None]
        out[i, s] = torch.where(mc[i, s] > 0, (rows > t).sum(1), (rows < t).sum(1))
    return out


def _scaled_subupdates(head: ScaledHead, values: torch.Tensor, m: torch.Tensor, targets: torch.Tensor | None,
                       max_elements: int):
    """:func:`_subupdates` through a :class:`ScaledHead`: each value's group logits are computed once per block.

    For token j of group g, ``log P(m v)_j = m z_g[j] + m a_g - lse_g - LSE_head`` (``a_g``: the cluster's logit in
    the head, ``lse_g = logsumexp(m z_g)``; both 0 for the shortlist). The top-1 is the best group's extreme token
    (argmax of ``z_g`` for m > 0, argmin for m < 0), and ``lp_j > lp_t`` iff ``z_g[j] > z_t + (a_t - a_g) -
    (lse_t - lse_g) / m`` (``<`` for m < 0): counted for all pairs at once in the shortlist (bucketing against the
    sentences' thresholds) and pair by pair in a tail cluster, unless the bounds below decide it (0 or all).
    ``lse_g`` lies in ``[max(m e_g, m mean(z_g) + log n_g), m e_g + log n_g]`` (``m e_g = max_j m z_g[j]``); it is
    computed exactly (O(n_g)) only for the (value, sentence) pairs that these bounds leave undecided.
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
        lse_lo = [zeros] + [torch.maximum(mc * e[g], mc * groups[g].mean(1, keepdim=True) + logn[g]) for g in range(1, K + 1)]
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
            tgroup = torch.bucketize(t, torch.as_tensor(cut[:-1], device=t.device), right=True)  # 0 = shortlist
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
                exact = torch.stack([mc * e[0]] + [mc * (a[g] + e[g]) - lse[g] for g in range(1, K + 1)], dim=-1)
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
        # tail clusters: decided by the bounds (0 or all of the cluster), else counted against the exact threshold
        for g in range(1, K + 1):
            n_g = groups[g].shape[1]
            counts += torch.where(all_cnt[g], torch.full_like(counts, n_g), torch.zeros_like(counts))
            todo = nz & ~zero_cnt[g] & ~all_cnt[g]
            thr = z_t + ((a_t - a[g]) - (lse_t - lse[g]) / safe_m)
            counts += _pair_count(groups[g], mc, todo, thr, max_elements)
        rank[:, sl] = counts.masked_fill(~nz, -1).T.cpu()
    return top, rank


def _subupdates(adapter: LMAdapter, values: torch.Tensor, m: torch.Tensor, targets: torch.Tensor | None,
                head: ScaledHead | None, max_elements: int):
    """``argmax P(m[s, i] v_i)`` and (optionally) the rank of ``targets[s]`` under it: ``[S, n]`` each; -1 where m = 0."""
    if head is not None:
        return _scaled_subupdates(head, values, m, targets, max_elements)
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


class FfnInfoScan:
    """FFN info as a scan (:mod:`fflayers.memories.scan`): units are blocks of length-bucketed batches of the
    sentences' prefixes (fixed by the data, ``batch_tokens`` and ``block_sentences``); partial results are row
    blocks of the table, concatenated in sentence order."""

    kind = "ffn_info"

    def __init__(self, adapter: LMAdapter, sentences: Sequence[Sequence[int]], mode: str,
                 layers: Iterable[int] | None = None, dims: Iterable[int] | None = None, seed: int = 0,
                 batch_tokens: int = 4096, block_sentences: int = 512, max_chunk_elements: int = 1 << 24,
                 head_shortcut: bool | None = None, dtype: torch.dtype | None = None) -> None:
        from fflayers.data.batching import plan_batches
        from fflayers.memories.scan import group_units

        if mode not in ("layer", "dim"):
            raise AdapterError(f"unknown extract mode {mode!r}; use 'layer' or 'dim'")
        if adapter.is_masked_lm:
            raise AdapterError("ffn info needs a causal LM (the position t predicts token t+1); this model is a masked LM")
        if batch_tokens < 1 or block_sentences < 1:
            raise AdapterError(f"batch_tokens={batch_tokens} and block_sentences={block_sentences} must be >= 1")
        self.adapter, self.mode, self.seed, self.dtype = adapter, mode, seed, dtype
        self.layers = check_layers(adapter, layers)
        d_ff = adapter.d_ff
        if mode == "dim":
            self.dim_list = list(range(d_ff)) if dims is None else sorted({int(d) for d in dims})
            if not self.dim_list or self.dim_list[0] < 0 or self.dim_list[-1] >= d_ff:
                raise AdapterError(f"dims must be a non-empty subset of 0..{d_ff - 1}")
        else:
            self.dim_list = list(range(d_ff))
        self.seqs = [list(map(int, s)) for s in sentences]
        self.positions = choose_positions([len(s) for s in self.seqs], seed, adapter.max_positions)
        self.keep = [k for k in range(len(self.seqs)) if self.positions[k] >= 0]
        if not self.keep:
            raise AdapterError("no sentence has 2 or more tokens; pass tokenized sentences (BOS + words)")
        self.prefixes = [self.seqs[k][: self.positions[k] + 1] for k in self.keep]
        self.shortcut = None if head_shortcut is False else scaled_head(adapter)
        if head_shortcut is True and self.shortcut is None:
            raise AdapterError("head_shortcut=True, but this model's head has no exact shortcut (final norm or bias); "
                               "pass head_shortcut=None")
        self.post_ln = _is_post_ln(adapter)
        self.max_chunk_elements = max_chunk_elements
        self.batches = plan_batches([len(p) for p in self.prefixes], batch_tokens)
        # blocks of at least `block` sentences: at least 8 of them when there are a few hundred sentences, so that
        # a sharded run has work for every worker; fixed by the data only, so any sharding computes the same blocks
        block = min(block_sentences, max(64, -(-len(self.prefixes) // 8)))
        self.blocks = group_units([len(b) for b in self.batches], block)
        self.n_units = len(self.blocks)
        self._values: dict | None = None

    def unit_sentences(self, unit: int) -> int:
        return sum(len(self.batches[b]) for b in self.blocks[unit])

    def _weights(self):
        if self._values is None:
            dev = self.adapter.device
            with torch.no_grad():
                values = {layer: self.adapter.ffn_values(layer).detach().to(dev) for layer in self.layers}
                norms = {layer: full_precision(values[layer]).norm(dim=1) for layer in self.layers}
            self._values = (values, norms, torch.as_tensor(self.dim_list, dtype=torch.long, device=dev))
        return self._values

    def run_units(self, units: range, progress=None) -> pd.DataFrame:
        from fflayers.data.batching import Batch
        from fflayers.memories.trigger_examples import autocast, collate

        adapter, seqs, keep, positions = self.adapter, self.seqs, self.keep, self.positions
        values, norms, dim_idx = self._weights()
        reduce = _reduce_layer if self.mode == "layer" else _reduce_dim
        frames = []
        with torch.no_grad():
            for unit in units:
                pending = []
                for b in self.blocks[unit]:
                    index = self.batches[b]
                    batch = Batch(*collate(self.prefixes, index, adapter.pad_id, None), list(index))
                    with autocast(adapter, self.dtype):
                        pending.append((index, _gather_forward(adapter, batch, self.layers, self.post_ln)))
                    if progress is not None:
                        progress(len(index))
                idx = [keep[i] for ix, _ in pending for i in ix]
                g = {name: torch.cat([p[name] for _, p in pending], dim=0 if name == "final" else 1)
                     for name in ("final", "r", "y", "m")}
                meta = (np.asarray(idx), positions[idx], np.asarray([seqs[k][positions[k] + 1] for k in idx]))
                frames.append(reduce(adapter, g, self.layers, values, norms, dim_idx, meta, self.shortcut,
                                     self.max_chunk_elements))
        return self.merge(frames)

    def merge(self, parts: list[pd.DataFrame]) -> pd.DataFrame:
        df = pd.concat(parts, ignore_index=True).sort_values(["sentence", "layer"], kind="stable")
        return df.reset_index(drop=True)

    def to_state(self, part: pd.DataFrame) -> pd.DataFrame:
        return part

    def from_state(self, state: pd.DataFrame) -> pd.DataFrame:
        return state

    def result(self, df: pd.DataFrame) -> pd.DataFrame:
        """The final table: columns in order and ``df.attrs`` (see :func:`extract_ffn_info`)."""
        df = df[LAYER_COLUMNS if self.mode == "layer" else DIM_COLUMNS]
        df.attrs.update({"mode": self.mode, "dims": self.dim_list if self.mode == "dim" else None,
                         "d_ff": self.adapter.d_ff, "seed": self.seed, "layers": self.layers,
                         "residual": "ffn_input" if self.post_ln else "resid_pre+attn_out",
                         "head_shortcut": self.shortcut.kind if self.shortcut else "none"})
        return df


def extract_ffn_info(
    adapter: LMAdapter,
    sentences: Sequence[Sequence[int]],
    mode: str,
    layers: Iterable[int] | None = None,
    dims: Iterable[int] | None = None,
    seed: int = 0,
    batch_tokens: int = 4096,
    progress: bool = True,
    block_sentences: int = 512,
    max_chunk_elements: int = 1 << 24,
    head_shortcut: bool | None = None,
    dtype: torch.dtype | None = None,
) -> pd.DataFrame:
    """Layer- or dim-level FFN information at one random position per sentence (see the module docstring).

    ``sentences``: token-id lists (BOS first where the model uses one). ``dims`` selects values in ``dim`` mode
    (ignored in ``layer`` mode, whose counts use all values). Up to ``block_sentences`` sentences (fewer on small
    runs: at least 8 blocks from 512 sentences on) are gathered before their sub-updates are projected;
    ``max_chunk_elements`` bounds the log-probs alive per projection chunk.
    ``head_shortcut``: None uses the exact shortcut when :func:`scaled_head` finds one, False never, True requires it.
    ``dtype`` (``torch.bfloat16`` / ``torch.float16``): autocast the forward pass; projections stay in full precision.
    (:class:`FfnInfoScan` with :mod:`fflayers.memories.scan` runs the same over torchrun ranks and job arrays.)
    """
    task = FfnInfoScan(adapter, sentences, mode, layers, dims, seed, batch_tokens, block_sentences,
                       max_chunk_elements, head_shortcut, dtype)
    bar = _progress(len(task.prefixes), f"ffn info ({mode})", progress)
    df = task.run_units(range(task.n_units), bar.update)
    bar.close()
    return task.result(df)


def _base_columns(meta, layer_list, final_top1, S):
    sent, pos, nxt = meta
    L = len(layer_list)
    return {
        "sentence": np.repeat(sent, L).astype(np.int64),
        "position": np.repeat(pos, L).astype(np.int64),
        "next_token": np.repeat(nxt, L).astype(np.int64),
        "layer": np.tile(np.asarray(layer_list, dtype=np.int64), S),
        "final_top1": np.repeat(final_top1.numpy(), L).astype(np.int64),
    }


def _reduce_layer(adapter, g, layers, values, norms, dim_idx, meta, shortcut, max_elements) -> pd.DataFrame:
    S = g["final"].shape[0]
    chunk = max(1, max_elements // adapter.vocab_size)
    final_top1, final_p, _, _ = _stats(adapter, g["final"], [], chunk)
    cols: dict[str, list] = {c: [] for c in LAYER_COLUMNS[6:]}
    for li, layer in enumerate(layers):
        r, y, m = g["r"][li], g["y"][li], g["m"][li]
        r_top, r_p, (r_rank,), (r_fp,) = _stats(adapter, r, [final_top1], chunk)
        y_top, y_p, (y_rank, y_rrank), (y_fp, _) = _stats(adapter, y, [final_top1, r_top], chunk)
        ry_top, ry_p, _, _ = _stats(adapter, r + y, [], chunk)
        sub_top, _ = _subupdates(adapter, values[layer], m, None, shortcut, max_elements)
        mc = full_precision(m).cpu()
        r_norm = full_precision(r).norm(dim=1).cpu()
        scaled = mc.abs() * norms[layer].cpu()[None]
        for name, val in (
            ("layer_top1", ry_top), ("layer_top1_prob", ry_p), ("residual_top1", r_top), ("residual_top1_prob", r_p),
            ("ffn_top1", y_top), ("ffn_top1_prob", y_p), ("residual_final_rank", r_rank),
            ("residual_final_prob", r_fp), ("ffn_final_rank", y_rank), ("ffn_final_prob", y_fp),
            ("ffn_rank_of_residual_top1", y_rrank), ("top1_changed", r_top != ry_top),
            ("memories_agreeing", ((sub_top == ry_top[:, None]) & (mc != 0)).sum(1)),
            ("active_memories", (mc > 0).sum(1)), ("residual_norm", r_norm.double()),
            ("residual_norm_rank", (scaled > r_norm[:, None]).sum(1)),
        ):
            cols[name].append(val.numpy())
    out = _base_columns(meta, layers, final_top1, S)
    out["final_top1_prob"] = np.repeat(final_p.numpy(), len(layers))
    for name, parts in cols.items():
        out[name] = np.stack(parts, axis=1).reshape(-1)  # [S, L'] -> sentence-major rows
    return pd.DataFrame(out)


def _reduce_dim(adapter, g, layers, values, norms, dim_idx, meta, shortcut, max_elements) -> pd.DataFrame:
    S = g["final"].shape[0]
    chunk = max(1, max_elements // adapter.vocab_size)
    final_top1, _, _, _ = _stats(adapter, g["final"], [], chunk)
    r_tops, r_ranks, coefs, v_tops, v_ranks = [], [], [], [], []
    for li, layer in enumerate(layers):
        r, m = g["r"][li], g["m"][li][:, dim_idx]
        r_top, _, (r_rank,), _ = _stats(adapter, r, [final_top1], chunk)
        v_top, v_rank = _subupdates(adapter, values[layer][dim_idx], m, final_top1, shortcut, max_elements)
        r_tops.append(r_top.numpy())
        r_ranks.append(r_rank.numpy())
        coefs.append((full_precision(m) * norms[layer][dim_idx][None]).cpu().numpy().astype(np.float32))
        v_tops.append(v_top.numpy())
        v_ranks.append(v_rank.numpy())
    out = _base_columns(meta, layers, final_top1, S)
    out["residual_top1"] = np.stack(r_tops, axis=1).reshape(-1)
    out["residual_final_rank"] = np.stack(r_ranks, axis=1).reshape(-1)
    for name, parts in (("coefficients", coefs), ("value_top1", v_tops), ("value_final_rank", v_ranks)):
        arr = np.stack(parts, axis=1).reshape(S * len(layers), -1)  # [S * L', n_dims]
        out[name] = list(arr)
    return pd.DataFrame(out)



def ffn_info_by_layer(table: pd.DataFrame, d_ff: int | None = None) -> pd.DataFrame:
    """Per-layer summary of a layer-mode table.

    ``rows``; ``active_mean`` (mean number of active memories) and ``active_share`` (divided by ``d_ff``, taken from
    ``table.attrs`` when not given; NaN when unknown); ``matches_memory`` (share of rows whose layer top-1 equals the
    top-1 of at least one sub-update), ``matches_residual`` (layer top-1 = residual top-1), ``matches_neither``;
    ``residual_is_final`` (the residual's top-1 is already the model's final top-1); ``residual_dominates``
    (``||r||`` exceeds every ``|m_i| ||v_i||``).
    """
    missing = [c for c in ("layer", "active_memories", "memories_agreeing", "top1_changed", "residual_final_rank",
                           "residual_norm_rank") if c not in table.columns]
    if missing:
        raise AdapterError(f"not a layer-mode ffn info table (missing {', '.join(missing)}); "
                           "pass the output of --extract_mode layer")
    d_ff = d_ff or table.attrs.get("d_ff")
    rows = []
    for layer, g in table.groupby("layer", sort=True):
        memory = g["memories_agreeing"] > 0
        residual = ~g["top1_changed"].astype(bool)
        rows.append({
            "layer": int(layer),
            "rows": len(g),
            "active_mean": float(g["active_memories"].mean()),
            "active_share": float(g["active_memories"].mean() / d_ff) if d_ff else float("nan"),
            "matches_memory": float(memory.mean()),
            "matches_residual": float(residual.mean()),
            "matches_neither": float((~memory & ~residual).mean()),
            "residual_is_final": float((g["residual_final_rank"] == 0).mean()),
            "residual_dominates": float((g["residual_norm_rank"] == 0).mean()),
        })
    return pd.DataFrame(rows)
