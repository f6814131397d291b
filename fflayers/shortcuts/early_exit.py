"""Early exit with shortcuts: stop after the first block whose shortcut is confident enough.

After block ``l`` (state ``l``, ``l = 1..L``) the shortcut distribution is ``project(A_{L,l} @ x_l)``
(``"mat"``) or ``project(x_l)`` (``"id"``); at ``l = L`` it is the model's own output. With ``p1 >= p2`` its
two largest probabilities, the example exits at the first ``l`` with
``p1 - p2 > 0.9 * lambda + 0.1 * exp(-4 * l / L)``, and at ``L`` when none does. State 0 is never an exit:
at least one block runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.shortcuts.evaluate import (
    Maps,
    check_chunk,
    check_mappings,
    check_states,
    shortcut_log_probs,
    shortcut_maps,
)


def exit_thresholds(lam: float, L: int) -> torch.Tensor:
    """Confidence thresholds ``[L]`` of layers ``1..L``: ``0.9 * lam + 0.1 * exp(-4 l / L)``."""
    layers = torch.arange(1, L + 1, dtype=torch.float64)
    return 0.9 * lam + 0.1 * torch.exp(-4.0 * layers / L)


def _check_lambdas(lambdas: Iterable[float]) -> list[float]:
    try:
        out = [float(x) for x in lambdas]
    except (TypeError, ValueError):
        raise InputError(f"lambdas must be a sequence of numbers, got {lambdas!r}") from None
    if not out or any(math.isnan(x) for x in out):
        raise InputError(f"lambdas must be one or more numbers (no NaN), got {out}")
    return out


def _shortcut_stats(
    adapter: LMAdapter, states: torch.Tensor, names: tuple[str, ...],
    mats: dict[int, torch.Tensor], chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence gaps ``p1 - p2`` ``[n, M, L-1]`` of the shortcuts from states ``1..L-1`` and top-1 tokens
    ``[n, M, L]`` of states ``1..L`` (the last one the model's own), on CPU."""
    n, L = states.shape[0], adapter.n_layers
    gaps = torch.empty(n, len(names), L - 1, dtype=torch.float64)
    top1 = torch.empty(n, len(names), L, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, n, chunk):
            block = states[start : start + chunk]
            rows = slice(start, start + block.shape[0])
            for layer in range(1, L):
                for mi, m in enumerate(names):
                    lp = shortcut_log_probs(adapter, block[:, layer], mats.get(layer) if m == "mat" else None)
                    p = lp.topk(2, dim=-1).values.double().exp()
                    gaps[rows, mi, layer - 1] = (p[:, 0] - p[:, 1]).cpu()
                    top1[rows, mi, layer - 1] = lp.argmax(-1).cpu()
            final = shortcut_log_probs(adapter, block[:, L]).argmax(-1).cpu()
            top1[rows, :, L - 1] = final[:, None]
    return gaps, top1


def early_exit(
    adapter: LMAdapter,
    states: torch.Tensor,
    maps: Maps | None,
    lambdas: Iterable[float],
    mapping: str | Iterable[str] = "both",
    chunk: int = 256,
) -> pd.DataFrame:
    """Simulate early exit for every ``lambda`` and shortcut ``mapping`` (``"mat"``, ``"id"`` or ``"both"``).

    One row per ``(lambda, mapping)``: ``mean_exit_layer`` (blocks processed, ``1..L``), ``layers_saved``
    (mean ``L - exit``) and ``precision@1`` (share of examples whose exit top-1 token is the model's final
    top-1). ``"mat"`` needs ``maps[(L, l)]`` for ``l = 1..L-1``. The shortcuts are computed once (``chunk``
    examples at a time) and every lambda is applied to them.
    """
    L = check_states(adapter, states)
    names = check_mappings(mapping)
    lams = _check_lambdas(lambdas)
    chunk = check_chunk(chunk)
    if adapter.vocab_size < 2:
        raise InputError("early exit compares the two most likely tokens; the vocabulary has fewer than two")
    mats = shortcut_maps(adapter, maps, range(1, L)) if "mat" in names else {}
    gaps, top1 = _shortcut_stats(adapter, states, names, mats, chunk)
    layer_idx = torch.arange(L)
    rows = []
    for lam in lams:
        fires = gaps > exit_thresholds(lam, L)[:-1]  # [n, M, L-1]
        fires = torch.cat([fires, torch.ones_like(fires[..., :1])], -1)  # layer L always exits
        first = torch.where(fires, layer_idx, L).amin(-1)  # [n, M], 0-based: exit layer - 1
        exit_layer = (first + 1).double()
        correct = top1.gather(-1, first[..., None])[..., 0] == top1[..., L - 1]
        for mi, m in enumerate(names):
            mean_exit = float(exit_layer[:, mi].mean())
            rows.append({
                "lambda": lam,
                "mapping": m,
                "mean_exit_layer": mean_exit,
                "layers_saved": L - mean_exit,
                "precision@1": float(correct[:, mi].double().mean()),
            })
    return pd.DataFrame(rows)
