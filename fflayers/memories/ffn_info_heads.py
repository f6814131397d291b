"""Exact shortcut heads for the sub-update projections of :mod:`fflayers.memories.ffn_info`.

``P(m v)`` (a coefficient ``m`` times a value ``v``) follows from per-value work alone when the output head
is homogeneous (linear without bias, no final norm: :func:`homogeneous_head`), a fairseq adaptive softmax
without a final norm, or sign-invariant (RMSNorm without bias, then a bias-free linear head:
:func:`sign_invariant_head`). :func:`scaled_head` finds the shortcut of a model; every candidate is verified
numerically against ``adapter.project`` before use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fflayers.backends.base import LMAdapter
from fflayers.memories.value_projections import full_precision

__all__ = ["ScaledHead", "homogeneous_head", "scaled_head", "sign_invariant_head"]


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
    """True when ``P(c h) = softmax(c log P(h))`` holds (a head whose logits are linear in ``h`` without bias
    and with no final norm), checked on a few values and random vectors at scales 2.5 and -0.6."""
    probe = _probe(adapter, seed)
    lp = full_precision(adapter.project(probe))
    return all(_close(full_precision(adapter.project(probe * c)), torch.log_softmax(lp * c, dim=-1))
               for c in (2.5, -0.6))


class ScaledHead:
    """An output head whose log-probs of ``c h`` follow exactly from per-group logits of ``h``.

    ``logits(h)`` returns group logits, each linear in ``h`` without bias: the head group (shortlist tokens
    ``0 .. cutoff[0] - 1`` followed by one logit per tail cluster) and one group per tail cluster (tokens
    ``cutoff[k] .. cutoff[k+1] - 1``). ``log P(c h)`` is the two-level softmax of the scaled groups (fairseq's
    adaptive softmax); a plain homogeneous head is the one-group case (``cutoff = [V]``).
    """

    def __init__(self, logits_fn: Callable[[torch.Tensor], Sequence[torch.Tensor]], cutoff: Sequence[int],
                 kind: str) -> None:
        self.logits_fn = logits_fn
        self.cutoff = [int(c) for c in cutoff]
        self.kind = kind

    @property
    def n_tails(self) -> int:
        """Number of tail clusters (0 for a one-group head)."""
        return len(self.cutoff) - 1

    def logits(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Group logits of the rows of ``h``, in full precision."""
        return [full_precision(z) for z in self.logits_fn(h)]

    def compose(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        """Full log-probs ``[N, V]`` from group logits."""
        head = torch.log_softmax(z[0], dim=-1)
        c0 = self.cutoff[0]
        parts = [head[:, :c0]]
        parts += [torch.log_softmax(z[k + 1], dim=-1) + head[:, c0 + k, None] for k in range(self.n_tails)]
        return torch.cat(parts, dim=1)


def _adaptive_head(adapter: LMAdapter) -> ScaledHead | None:
    """fairseq adaptive softmax without a final LayerNorm (``decoder.adaptive_softmax``: head, tail,
    cutoff)."""
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
    scale-invariant final norm without bias or centring (RMSNorm: ``norm(c h) = s(c) norm(h)``, ``s`` of
    the sign of ``c``) followed by a bias-free linear head (Llama-style models). Sub-update top-1s and ranks
    depend only on that order, so the linear shortcut applies to them. Checked on probe vectors at scales 3,
    0.02, -0.7 and -5.
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
