"""Coarse and refined neuron selection on hand-made scores and neuron sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fflayers.core import FflayersError
from fflayers.neurons import coarse_neurons, refine_neurons


def _scores() -> torch.Tensor:
    s = torch.zeros(3, 5)
    s[0, 1], s[1, 4], s[2, 0], s[2, 3] = 10.0, 4.0, 2.9, 3.1
    return s


def test_coarse_absolute_adaptive_percentile():
    s = _scores()
    assert coarse_neurons(s, threshold=3.0) == [[0, 1], [1, 4], [2, 3]]
    assert coarse_neurons(s, adaptive_threshold=0.3) == [[0, 1], [1, 4], [2, 3]]  # cut 3.0
    assert coarse_neurons(s, adaptive_threshold=0.5) == [[0, 1]]
    ramp = torch.arange(100.0).reshape(4, 25)
    top = coarse_neurons(ramp, percentile=90)  # numpy: 89.1 -> 90..99
    assert top == [[3, i] for i in range(15, 25)]
    assert np.percentile(ramp.numpy(), 90) == pytest.approx(89.1)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"threshold": 1.0, "adaptive_threshold": 0.3}, "exactly one"),
    ({"adaptive_threshold": 1.5}, "out of range"),
    ({"adaptive_threshold": -0.1}, "out of range"),
    ({"percentile": 101}, "out of range"),
    ({"threshold": float("nan")}, "out of range"),
    ({"percentile": "high"}, "must be a number"),
])
def test_bad_thresholds(kwargs, message):
    with pytest.raises(FflayersError, match=message):
        coarse_neurons(_scores(), **kwargs)


def test_refined_share_and_negatives():
    coarse = [
        [[0, 1], [1, 2], [2, 3]],
        [[0, 1], [1, 2]],
        [[0, 1], [2, 3], [2, 3]],  # duplicates count once per prompt
        [[0, 1], [5, 5]],
    ]
    # counts: (0,1): 4, (1,2): 2, (2,3): 2, (5,5): 1 of 4 prompts
    assert refine_neurons(coarse, p=0.5) == [[0, 1]]  # more than 2 of 4
    assert refine_neurons(coarse, p=0.25) == [[0, 1], [1, 2], [2, 3]]  # more than 1
    assert refine_neurons(coarse, p=0.0) == [[0, 1], [1, 2], [2, 3], [5, 5]]
    negatives = [[[1, 2]], [[7, 7], [0, 1]]]
    assert refine_neurons(coarse, p=0.25, negative=negatives) == [[2, 3]]


@pytest.mark.parametrize("p", [1.0, -0.1, 2])
def test_bad_share(p):
    with pytest.raises(FflayersError, match="p="):
        refine_neurons([[[0, 1]]], p=p)
