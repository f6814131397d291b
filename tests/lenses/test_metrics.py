"""Lens metrics vs an independent numpy computation on small inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fflayers.core import InputError
from fflayers.lenses.metrics import LensMetrics, token_rows


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_metrics_equal_numpy():
    rng = np.random.default_rng(0)
    n, V = 40, 30
    final = log_softmax(rng.normal(size=(n, V)) * 2)
    lens = log_softmax(rng.normal(size=(n, V)) * 2)
    targets = rng.integers(0, V, size=n)
    m = LensMetrics(V)
    for part in (slice(0, 17), slice(17, n)):  # two batches: the sums must add up
        m.add(torch.tensor(final[part]), torch.tensor(lens[part]), torch.tensor(targets[part]))
    row = m.row()
    p, q = np.exp(final), np.exp(lens)
    top = final.argmax(-1)
    order = np.argsort(-lens, axis=-1)
    want = {
        "kl_bits": np.mean((p * (final - lens)).sum(-1)) / np.log(2),
        "ce_bits": np.mean(-lens[np.arange(n), targets]) / np.log(2),
        "top1_agreement": np.mean(lens.argmax(-1) == top),
        "precision_at_5": np.mean([top[i] in order[i, :5] for i in range(n)]),
        "precision_at_10": np.mean([top[i] in order[i, :10] for i in range(n)]),
        "surprisal_bits": np.mean(-lens[np.arange(n), top]) / np.log(2),
    }
    mp, mq = p.mean(0), q.mean(0)
    want["marginal_kl_bits"] = (mp * np.log(mp / mq)).sum() / np.log(2)
    assert m.n == n
    for key, value in want.items():
        assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_token_rows():
    seqs = [[1, 2, 3, 4], [5], [6, 7]]
    assert token_rows(seqs, "all") == [[0, 1, 2], [], [0]]
    picked = token_rows(seqs, "random", seed=3)
    assert len(picked[0]) == 1 and 0 <= picked[0][0] < 3 and picked[1] == [] and picked[2] == [0]
    assert token_rows(seqs, "random", seed=3) == picked
    with pytest.raises(InputError, match="use all or random"):
        token_rows(seqs, "some")
