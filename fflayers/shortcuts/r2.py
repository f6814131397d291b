"""Coefficient of determination of linear shortcuts, as ``sklearn.metrics.r2_score`` defines it.

Per coordinate k of state j: ``R^2_k = 1 - sum (y - y_hat)^2 / sum (y - mean y)^2``; coordinates with zero
variance count 1.0 when predicted exactly and 0.0 otherwise (sklearn's ``force_finite``); the score is the
mean over coordinates (``multioutput="uniform_average"``). Computed in float64, in chunks of rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fflayers.core import InputError

_CHUNK = 4096


def r2_from_sums(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    """Mean over coordinates of ``1 - numerator / denominator`` (residual and total sums of squares per
    coordinate), with sklearn's ``force_finite`` rule for zero-variance coordinates."""
    scores = torch.ones_like(numerator)
    valid = (denominator != 0) & (numerator != 0)
    scores[valid] = 1 - numerator[valid] / denominator[valid]
    scores[(numerator != 0) & (denominator == 0)] = 0.0
    return float(scores.mean())


def _sum_sq(y: torch.Tensor, pred_fn) -> torch.Tensor:
    """Per-coordinate ``sum (y - pred)^2`` over rows, chunked."""
    total = torch.zeros(y.shape[-1], dtype=torch.float64, device=y.device)
    for s in range(0, y.shape[0], _CHUNK):
        rows = slice(s, s + _CHUNK)
        total += (y[rows].double() - pred_fn(rows)).square().sum(0)
    return total


def r2_scores(states: torch.Tensor, maps: Mapping[tuple[int, int], torch.Tensor]):
    """R^2 of predicting state j from state i, per map key ``(j, i)``: a DataFrame with columns i, j, mapping,
    r2; mapping ``"mat"`` predicts ``X_i @ A.T``, ``"id"`` predicts ``X_i`` itself. Rows sorted by i, j,
    mapping.
    """
    import pandas as pd

    if states.dim() != 3:
        raise InputError(f"states must be [positions, states, d], got shape {tuple(states.shape)}")
    n, S, d = states.shape
    if n < 2:
        raise InputError(f"R^2 needs at least 2 positions, got {n}; pass more states")
    if not maps:
        raise InputError("no maps to score; fit them first (fit_maps)")
    denominators: dict[int, torch.Tensor] = {}
    rows = []
    for (j, i), A in sorted(maps.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if not 0 <= i < j < S:
            raise InputError(f"map ({j}, {i}) does not fit states 0..{S - 1}; use maps fitted for this model")
        if tuple(A.shape) != (d, d):
            raise InputError(f"map ({j}, {i}) has shape {tuple(A.shape)}, the states have d = {d}; "
                               "use maps fitted for this model")
        y = states[:, j]
        if j not in denominators:
            mean = y.double().mean(0)
            denominators[j] = _sum_sq(y, lambda r, mean=mean: mean)
        At = A.to(states.device, torch.float64).T
        x = states[:, i]
        mat = _sum_sq(y, lambda r, x=x, At=At: x[r].double() @ At)
        ident = _sum_sq(y, lambda r, x=x: x[r].double())
        rows.append((i, j, "id", r2_from_sums(ident, denominators[j])))
        rows.append((i, j, "mat", r2_from_sums(mat, denominators[j])))
    return pd.DataFrame(rows, columns=["i", "j", "mapping", "r2"])
