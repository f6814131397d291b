"""From attribution scores to neurons: coarse thresholds per prompt, refined neurons shared across prompts.

Neurons are ``[layer, neuron]`` pairs of Python ints, sorted by layer then neuron.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from fflayers.core import InputError

Neuron = list[int]


def check_threshold(threshold: float | None, adaptive_threshold: float | None, percentile: float | None,
                    prefix: str = "") -> tuple[str, float]:
    """The one threshold kind given, as ``(kind, value)``; :class:`~fflayers.core.InputError` for none,
    several, or a value out of range (``adaptive_threshold`` in [0, 1], ``percentile`` in [0, 100],
    ``threshold`` finite)."""
    given = {k: v for k, v in (("threshold", threshold), ("adaptive_threshold", adaptive_threshold),
                               ("percentile", percentile)) if v is not None}
    names = ", ".join(prefix + k for k in ("threshold", "adaptive_threshold", "percentile"))
    if len(given) != 1:
        got = ", ".join(f"{prefix}{k}={v}" for k, v in given.items()) or "none"
        raise InputError(f"give exactly one of {names} (got {got}); set the others to None")
    kind, value = next(iter(given.items()))
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{prefix}{kind} must be a number, got {value!r}") from None
    ranges = {"threshold": (-math.inf, math.inf), "adaptive_threshold": (0.0, 1.0),
              "percentile": (0.0, 100.0)}
    lo, hi = ranges[kind]
    if not (math.isfinite(value) and lo <= value <= hi):
        where = "a finite number" if kind == "threshold" else f"in [{lo:g}, {hi:g}]"
        raise InputError(f"{prefix}{kind}={value} is out of range; it must be {where}")
    return kind, value


def coarse_neurons(scores: torch.Tensor, threshold: float | None = None,
                   adaptive_threshold: float | None = None, percentile: float | None = None) -> list[Neuron]:
    """Neurons whose score exceeds the cut: ``threshold`` (absolute), ``adaptive_threshold * max(scores)``, or
    the ``percentile``-th percentile of all scores. Exactly one of the three."""
    kind, value = check_threshold(threshold, adaptive_threshold, percentile)
    scores = scores.detach().float()
    if scores.dim() != 2:
        raise InputError(f"scores must be [layers, d_ff], got shape {tuple(scores.shape)}")
    if kind == "threshold":
        cut = value
    elif kind == "adaptive_threshold":
        cut = value * float(scores.max())
    else:
        cut = float(np.percentile(scores.flatten().cpu().numpy(), value))
    return [[int(layer), int(i)] for layer, i in torch.nonzero(scores > cut).tolist()]


def check_share(p: float) -> float:
    """``p`` as a float in [0, 1), or :class:`~fflayers.core.InputError`."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise InputError(f"p must be a number in [0, 1), got {p!r}") from None
    if not 0.0 <= p < 1.0:
        raise InputError(f"p={p} is out of range; it is the share of prompts a neuron must exceed, in [0, 1)")
    return p


def _as_set(neurons: Iterable[Sequence[int]]) -> set[tuple[int, int]]:
    return {(int(n[0]), int(n[1])) for n in neurons}


def refine_neurons(coarse: Sequence[Iterable[Sequence[int]]], p: float = 0.5,
                   negative: Sequence[Iterable[Sequence[int]]] | None = None) -> list[Neuron]:
    """Neurons found in more than ``p`` of the prompts' coarse sets, minus every neuron found in any of the
    negative examples' coarse sets."""
    p = check_share(p)
    if not coarse:
        raise InputError("no coarse neuron sets to refine; give at least one prompt")
    counts = Counter(n for neurons in coarse for n in _as_set(neurons))
    shared = {n for n, c in counts.items() if c > p * len(coarse)}
    for neurons in negative or ():
        shared -= _as_set(neurons)
    return [list(n) for n in sorted(shared)]
