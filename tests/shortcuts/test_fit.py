"""Gram-accumulated linear maps, R^2 and the maps file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.shortcuts import (
    GramAccumulator,
    apply_map,
    fit_maps,
    load_maps,
    maps_metadata,
    r2_scores,
    save_maps,
)
from tests.fixtures.hf_models import tiny_model

S, D = 4, 8


def correlated_states(n: int, S: int = S, d: int = D, seed: int = 0) -> torch.Tensor:
    """``[n, S, d]``: each state a noisy random linear function of the previous one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3.0, d)
    out = [x]
    for _ in range(S - 1):
        x = x + x @ torch.randn(d, d, generator=g) / d**0.5 + 0.3 * torch.randn(n, d, generator=g)
        out.append(x)
    return torch.stack(out, dim=1)


def accumulate(states: torch.Tensor, batch: int) -> GramAccumulator:
    acc = GramAccumulator(states.shape[1], states.shape[2])
    for s in range(0, states.shape[0], batch):
        acc.update(states[s : s + batch])
    return acc


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_maps_equal_lstsq_on_stacked_data():
    states = correlated_states(300)
    maps = fit_maps(accumulate(states, 64))
    assert sorted(maps) == sorted((j, i) for i in range(S) for j in range(i + 1, S))
    X = states.double().numpy()
    for (j, i), A in maps.items():
        assert A.shape == (D, D) and A.dtype == torch.float32
        ref = np.linalg.lstsq(X[:, i], X[:, j], rcond=None)[0].T
        assert rel(A, ref) < 1e-5


def test_planted_relation_is_recovered():
    g = torch.Generator().manual_seed(1)
    Xi = torch.randn(200, D, dtype=torch.float64, generator=g)
    B = torch.randn(D, D, dtype=torch.float64, generator=g)
    states = torch.stack([Xi, Xi @ B.T], dim=1)
    A = fit_maps(accumulate(states, 50))[1, 0]
    assert rel(A, B) < 1e-6
    assert rel(apply_map(A, Xi), Xi @ B.T) < 1e-6


def test_maps_do_not_depend_on_update_batch_size():
    states = correlated_states(257)
    ref = fit_maps(accumulate(states, 257))
    for batch in (1, 10, 100):
        maps = fit_maps(accumulate(states, batch))
        for key, A in maps.items():
            assert rel(A, ref[key]) < 1e-6


def test_pairs_select_maps_and_reject_wrong_order():
    acc = accumulate(correlated_states(100), 32)
    assert sorted(fit_maps(acc, pairs=[(0, 3), (1, 2)])) == [(2, 1), (3, 0)]
    for bad in ([(2, 1)], [(1, 1)], [(0, S)]):
        with pytest.raises(FflayersError, match="pair"):
            fit_maps(acc, pairs=bad)


def test_underdetermined_needs_ridge():
    acc = accumulate(correlated_states(5), 5)  # 5 positions < d = 8
    with pytest.raises(FflayersError, match="underdetermined: 5 positions for d = 8 dims"):
        fit_maps(acc)
    maps = fit_maps(acc, ridge=1e-3)
    assert all(torch.isfinite(A).all() for A in maps.values())


def test_singular_gram_is_refused_without_ridge():
    states = correlated_states(100)
    states[:, :, 3] = states[:, :, 2]  # two identical coordinates: G_i is singular
    acc = accumulate(states, 100)
    with pytest.raises(FflayersError, match="ill-conditioned"):
        fit_maps(acc)
    assert len(fit_maps(acc, ridge=1e-6)) == S * (S - 1) // 2


def test_bad_input_is_refused():
    acc = GramAccumulator(S, D)
    with pytest.raises(FflayersError, match="no positions"):
        fit_maps(acc)
    with pytest.raises(FflayersError, match="do not fit"):
        acc.update(torch.zeros(3, S + 1, D))
    with pytest.raises(FflayersError, match="NaN"):
        acc.update(torch.full((3, S, D), float("nan")))
    with pytest.raises(FflayersError, match="ridge"):
        fit_maps(accumulate(correlated_states(50), 50), ridge=-1.0)


def test_r2_equals_sklearn():
    from sklearn.metrics import r2_score

    states = correlated_states(150).double()
    # zero-variance coordinates (sklearn's force_finite rule): 1.0 where predicted exactly, else 0.0
    states[:, 1:3, 5] = 0.0
    maps = fit_maps(accumulate(states, 40), ridge=1e-3)  # the zero coordinate makes G_1 singular
    df = r2_scores(states, maps)
    assert list(df.columns) == ["i", "j", "mapping", "r2"]
    assert len(df) == 2 * len(maps)
    X = states.numpy()
    for row in df.itertuples():
        A = maps[row.j, row.i].double().numpy()
        pred = X[:, row.i] @ A.T if row.mapping == "mat" else X[:, row.i]
        assert row.r2 == pytest.approx(r2_score(X[:, row.j], pred, multioutput="uniform_average"), abs=1e-10)


def test_r2_of_exact_prediction_is_one():
    g = torch.Generator().manual_seed(2)
    Xi = torch.randn(100, D, dtype=torch.float64, generator=g)
    states = torch.stack([Xi, 2 * Xi], dim=1)
    df = r2_scores(states, fit_maps(accumulate(states, 100))).set_index("mapping")
    assert df.loc["mat", "r2"] == pytest.approx(1.0, abs=1e-9)
    assert df.loc["id", "r2"] < 1.0


def test_save_load_round_trip(tmp_path):
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    S_, d = adapter.n_layers + 1, adapter.d_model
    maps = fit_maps(accumulate(correlated_states(200, S_, d), 64))
    meta = maps_metadata(adapter, data_hash="abc", seed=3, n_positions=200, ridge=0.0)
    path = tmp_path / "maps.safetensors"
    save_maps(path, maps, meta)
    loaded, meta2 = load_maps(path, adapter)
    assert meta2 == meta
    assert sorted(loaded) == sorted(maps)
    for key, A in maps.items():
        assert torch.equal(loaded[key], A)


def test_load_refuses_other_models_and_missing_files(tmp_path):
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    path = tmp_path / "maps.safetensors"
    with pytest.raises(FflayersError, match="does not exist"):
        load_maps(path, adapter)
    other_d = fit_maps(accumulate(correlated_states(100, adapter.n_layers + 1, 16), 100))
    save_maps(path, other_d, {"model": "elsewhere"})
    with pytest.raises(FflayersError, match="d_model = 16, this model has 32"):
        load_maps(path, adapter)
    same_d = fit_maps(accumulate(correlated_states(100, 3, adapter.d_model), 100))
    save_maps(path, same_d, {})
    with pytest.raises(FflayersError, match="fitted for 3 states, this model has 4"):
        load_maps(path, adapter)
    llama = HFAdapter(tiny_model("llama"), device="cpu")
    save_maps(path, fit_maps(accumulate(correlated_states(100, 4, 32), 100)),
              maps_metadata(llama, "x", 0, 100, 0.0))
    with pytest.raises(FflayersError, match="fitted for HFAdapter\\(family='llama'"):
        load_maps(path, adapter)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(FflayersError, match="not a readable safetensors file"):
        load_maps(path)
