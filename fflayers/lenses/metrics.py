"""Lenses measured on the same tokens: per lens and layer, how close its reading is to the model's final
distribution and to the true next token.

For every token that has a next token in its sequence (``n_tokens`` of them), with ``p`` the model's final
distribution and ``q`` the lens's reading of the layer-``l`` state:

- ``kl_bits``: mean KL(p || q) in bits;
- ``ce_bits``: mean -log2 q(next token) (bits per token);
- ``top1_agreement``: how often argmax q = argmax p (mat's precision@1);
- ``precision_at_5`` / ``precision_at_10``: how often argmax p is among q's top 5 / 10 ("Jump to
  Conclusions");
- ``surprisal_bits``: mean -log2 q(argmax p);
- ``marginal_kl_bits``: KL(mean p || mean q), the lens's bias toward some tokens whatever the input.

``positions="all"`` uses every such token of every sequence; ``"random"`` one of them per sequence (seeded),
the protocol of "Jump to Conclusions".
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.data.batching import pad_right
from fflayers.lenses.lens import Lens, check_lens_layer, sequence_states

__all__ = ["METRICS", "LensMetrics", "evaluate_lenses", "token_rows"]

METRICS = ("kl_bits", "ce_bits", "top1_agreement", "precision_at_5", "precision_at_10", "surprisal_bits",
           "marginal_kl_bits")
LN2 = math.log(2.0)


class LensMetrics:
    """Running sums of one (lens, layer): :meth:`add` a batch of readings, :meth:`row` the means."""

    def __init__(self, vocab_size: int) -> None:
        self.n = 0
        self.sums = dict.fromkeys(METRICS[:-1], 0.0)
        self.mean_p = torch.zeros(vocab_size, dtype=torch.float64)
        self.mean_q = torch.zeros(vocab_size, dtype=torch.float64)

    def add(self, final: torch.Tensor, lens: torch.Tensor, targets: torch.Tensor) -> None:
        """``final``, ``lens``: log-probs ``[n, V]``; ``targets``: the true next tokens ``[n]``."""
        final, lens = final.double(), lens.double()
        p = final.exp()
        top = final.argmax(-1)
        rows = torch.arange(final.shape[0])
        lens_top = lens.topk(10, dim=-1).indices
        self.sums["kl_bits"] += float((p * (final - lens)).sum(-1).sum()) / LN2
        self.sums["ce_bits"] += float(-lens[rows, targets].sum()) / LN2
        self.sums["top1_agreement"] += float((lens_top[:, 0] == top).sum())
        self.sums["precision_at_5"] += float((lens_top[:, :5] == top[:, None]).any(-1).sum())
        self.sums["precision_at_10"] += float((lens_top == top[:, None]).any(-1).sum())
        self.sums["surprisal_bits"] += float(-lens[rows, top].sum()) / LN2
        self.mean_p += p.sum(0)
        self.mean_q += lens.exp().sum(0)
        self.n += final.shape[0]

    def row(self) -> dict:
        out = {name: value / self.n for name, value in self.sums.items()}
        mp, mq = self.mean_p / self.n, self.mean_q / self.n
        keep = mp > 0
        out["marginal_kl_bits"] = float((mp[keep] * (mp[keep].log() - mq[keep].log())).sum()) / LN2
        return out


def token_rows(sequences: Sequence[Sequence[int]], positions: str = "all", seed: int = 0) -> list[list[int]]:
    """Per sequence, the token indices read: every one with a next token, or one of them at random."""
    if positions not in ("all", "random"):
        raise InputError(f"positions={positions!r}; use all or random")
    rng = random.Random(seed)
    out = []
    for s in sequences:
        usable = list(range(len(s) - 1))
        out.append(usable if positions == "all" else ([rng.choice(usable)] if usable else []))
    return out


def evaluate_lenses(
    adapter: LMAdapter,
    lenses: Mapping[str, Lens],
    sequences: Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    positions: str = "all",
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    dtype: str = "fp32",
):
    """One row per (lens, layer): ``lens, layer, n_tokens`` and :data:`METRICS` (a DataFrame), every lens read
    on the same tokens of ``sequences`` (token ids); ``dtype``: autocast of the forward (see
    :func:`~fflayers.lenses.lens.sequence_states`)."""
    import pandas as pd
    from tqdm.auto import tqdm

    L = adapter.n_layers
    layers = list(range(L + 1)) if layers is None else [check_lens_layer(adapter, layer) for layer in layers]
    if not lenses:
        raise InputError("no lens to evaluate")
    picks = token_rows(sequences, positions, seed)
    work = [(s, r) for s, r in zip(sequences, picks, strict=True) if r]
    if not work:
        raise InputError("no token to evaluate: every sequence is shorter than 2 tokens")
    stats = {(name, layer): LensMetrics(adapter.vocab_size) for name in lenses for layer in layers}
    pad = adapter.vocab.pad_id if adapter.vocab.pad_id is not None else 0
    for start in tqdm(range(0, len(work), batch_size), desc="lenses", unit="batch", disable=not progress):
        chunk = work[start : start + batch_size]
        seqs = [list(s) for s, _ in chunk]
        ids, mask = pad_right(seqs, pad)
        states = sequence_states(adapter, ids, mask, dtype)  # [n_tokens, L+1, d], row-major over the batch
        offsets, flat, targets = 0, [], []
        for s, rows in zip(seqs, (r for _, r in chunk), strict=True):
            flat.extend(offsets + t for t in rows)
            targets.extend(s[t + 1] for t in rows)
            offsets += len(s)
        picked = states[torch.tensor(flat)]
        targets_t = torch.tensor(targets)
        with torch.no_grad():
            final = adapter.project(picked[:, L]).float().cpu()
            for name, lens in lenses.items():
                for layer in layers:
                    stats[name, layer].add(final, lens.log_probs(picked[:, layer], layer).cpu(), targets_t)
    rows = [{"lens": name, "layer": layer, "n_tokens": stats[name, layer].n, **stats[name, layer].row()}
            for name in lenses for layer in layers]
    return pd.DataFrame(rows)
