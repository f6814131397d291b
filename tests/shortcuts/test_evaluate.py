"""Shortcut evaluation and early exit on tiny random GPT-2 and Llama models, against direct recomputations
(states captured here with plain hooks, maps fitted here with lstsq: independent of the rest of the
package)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.hooks import capture
from fflayers.shortcuts.early_exit import early_exit
from fflayers.shortcuts.evaluate import evaluate_shortcuts
from tests.fixtures.hf_models import VOCAB, tiny_model

ARCHS = ["gpt2", "llama"]
KS = (1, 5, 10)
LN2 = math.log(2)


def sentences(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def sentence_states(adapter, ids: torch.Tensor) -> torch.Tensor:
    """States ``[T, L+1, d]`` of one unpadded sentence: resid_pre of block 0, then resid_post of every
    block."""
    L = adapter.n_layers
    with capture(adapter, ["resid_pre", "resid_post"], layers=range(L)) as c, torch.no_grad():
        adapter.run(ids[None])
    return (torch.stack([c["resid_pre", 0][0]] + [c["resid_post", layer][0] for layer in range(L)], 1)
            .float().cpu())


def lstsq_maps(states: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """``A_{L,i}`` with ``X_L ≈ X_i @ A.T`` by least squares."""
    L = states.shape[1] - 1
    return {(L, i): torch.linalg.lstsq(states[:, i], states[:, L]).solution.T.contiguous() for i in range(L)}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    adapter = HFAdapter(tiny_model(request.param), device="cpu")
    fit = torch.cat([sentence_states(adapter, s) for s in sentences(40, seed=1)])
    evaluated = sentences(12, seed=2)
    states = torch.stack([sentence_states(adapter, s)[-1] for s in evaluated])
    return adapter, states, lstsq_maps(fit), evaluated


def direct(adapter, states, i, A, ks=KS):
    """Precision@k and surprisal of one shortcut, recomputed in the plainest way."""
    L = adapter.n_layers
    final = adapter.project(states[:, L])
    x = states[:, i] if A is None else states[:, i] @ A.T
    top1 = adapter.project(x).argmax(-1)
    prec = {k: float((final.topk(k).indices == top1[:, None]).any(-1).double().mean()) for k in ks}
    return prec, float((-final.gather(1, top1[:, None]) / LN2).mean())


def test_states_end_with_the_model_output(case):
    adapter, states, _, evaluated = case
    lp = torch.stack([adapter.log_probs(s[None])[0, -1] for s in evaluated])
    torch.testing.assert_close(adapter.project(states[:, adapter.n_layers]), lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [256, 5])
def test_shortcuts_match_direct_recomputation(case, chunk):
    adapter, states, maps, _ = case
    L = adapter.n_layers
    df = evaluate_shortcuts(adapter, states, maps, ks=KS, chunk=chunk)
    assert list(df.columns) == ["layer", "mapping", "precision@1", "precision@5", "precision@10", "surprisal"]
    assert list(zip(df.layer, df.mapping, strict=True)) == [(i, m) for i in range(L) for m in ("id", "mat")]
    for row in df.itertuples(index=False):
        A = maps[(L, row.layer)] if row.mapping == "mat" else None
        prec, bits = direct(adapter, states, row.layer, A)
        assert [row[2], row[3], row[4]] == pytest.approx([prec[k] for k in KS])
        assert row.surprisal == pytest.approx(bits, abs=1e-5)
        assert row[2] <= row[3] <= row[4]
    assert (df.surprisal > 0).all()


def test_identity_maps_equal_id(case):
    adapter, states, _, _ = case
    L, d = adapter.n_layers, adapter.d_model
    df = evaluate_shortcuts(adapter, states, {(L, i): torch.eye(d) for i in range(L)}, ks=(10, 1, 5, 5))
    ident, mat = (df[df.mapping == m].drop(columns="mapping").reset_index(drop=True) for m in ("id", "mat"))
    pd.testing.assert_frame_equal(ident, mat)
    only_id = evaluate_shortcuts(adapter, states, None, mappings="id")
    pd.testing.assert_frame_equal(only_id.drop(columns="mapping"), ident)


def test_planted_map_is_exact(case):
    adapter, _, _, _ = case
    L, d = adapter.n_layers, adapter.d_model
    g = torch.Generator().manual_seed(3)
    for i in range(L):
        X = torch.randn(60, L + 1, d, generator=g)
        B = torch.randn(d, d, generator=g) / math.sqrt(d)
        X[:, L] = X[:, i] @ B.T
        final = adapter.project(X[:, L])
        top2 = final.topk(2).values
        X = X[top2[:, 0] - top2[:, 1] > 1e-3]  # no near-ties: the top-1 is unambiguous
        assert X.shape[0] >= 20
        maps = {(L, j): torch.eye(d) for j in range(L)} | {(L, i): B}
        df = evaluate_shortcuts(adapter, X, maps, chunk=7)
        row = df[(df.layer == i) & (df.mapping == "mat")].iloc[0]
        assert [row[f"precision@{k}"] for k in KS] == [1.0, 1.0, 1.0]
        own = float((-adapter.project(X[:, L]).max(-1).values / LN2).mean())
        assert row.surprisal == pytest.approx(own, rel=1e-5)


def test_bad_input(case):
    adapter, states, maps, _ = case
    L = adapter.n_layers
    missing = {k: v for k, v in maps.items() if k != (L, 1)}
    with pytest.raises(FflayersError, match=rf"\({L}, 1\).*fit"):
        evaluate_shortcuts(adapter, states, missing)
    with pytest.raises(FflayersError, match=rf"\({L}, 1\).*fit"):
        early_exit(adapter, states, missing, [0.0], mapping="mat")
    with pytest.raises(FflayersError, match="states must be"):
        evaluate_shortcuts(adapter, states[:, :L], maps)
    with pytest.raises(FflayersError, match="ks"):
        evaluate_shortcuts(adapter, states, maps, ks=(0, 5))
    with pytest.raises(FflayersError, match="mapping"):
        early_exit(adapter, states, maps, [0.0], mapping="lens")
    with pytest.raises(FflayersError, match="shape"):
        evaluate_shortcuts(adapter, states, {**maps, (L, 0): torch.eye(3)})


def test_early_exit_extremes(case):
    adapter, states, maps, _ = case
    L = adapter.n_layers
    df = early_exit(adapter, states, maps, [10.0, -10.0], mapping="both")
    assert list(df.columns) == ["lambda", "mapping", "mean_exit_layer", "layers_saved", "precision@1"]
    assert list(zip(df["lambda"], df.mapping, strict=True)) == [(10.0, "id"), (10.0, "mat"), (-10.0, "id"),
                                                                (-10.0, "mat")]
    never = df[df["lambda"] == 10.0]
    assert (never.mean_exit_layer == L).all() and (never.layers_saved == 0).all()
    assert (never["precision@1"] == 1.0).all()
    always = df[df["lambda"] == -10.0]
    assert (always.mean_exit_layer == 1).all() and (always.layers_saved == L - 1).all()
    for row in always.itertuples(index=False):  # exit after block 1: precision of the shortcut from state 1
        A = maps[(L, 1)] if row.mapping == "mat" else None
        assert row[4] == pytest.approx(direct(adapter, states, 1, A)[0][1])


def reference_exit(adapter, states, maps, lam, mapping):
    """Mean exit layer and precision@1, one example and one layer at a time."""
    L = adapter.n_layers
    exits, correct = [], []
    for x in states:
        final_top1 = int(adapter.project(x[L]).argmax())
        for layer in range(1, L + 1):
            h = x[layer] if layer == L or mapping == "id" else maps[(L, layer)] @ x[layer]
            p = adapter.project(h).exp()
            p1, p2 = sorted(p.tolist(), reverse=True)[:2]
            if layer == L or p1 - p2 > 0.9 * lam + 0.1 * math.exp(-4 * layer / L):
                break
        exits.append(layer)
        correct.append(int(p.argmax()) == final_top1)
    return sum(exits) / len(exits), sum(correct) / len(correct)


def test_early_exit_matches_loop(case):
    adapter, states, maps, _ = case
    L = adapter.n_layers
    lambdas = [-10.0, 0.0, 10.0]
    for layer in range(1, L):  # thresholds inside the spread of the gaps, so that some examples exit there
        for A in (None, maps[(L, layer)]):
            p = adapter.project(states[:, layer] if A is None
                                else states[:, layer] @ A.T).exp().topk(2).values
            gap, base = p[:, 0] - p[:, 1], 0.1 * math.exp(-4 * layer / L)
            lambdas += [(float(gap.double().quantile(q)) - base) / 0.9 for q in (0.3, 0.7)]
    df = early_exit(adapter, states, maps, lambdas, chunk=5)
    assert len(df) == 2 * len(lambdas)
    for row in df.itertuples(index=False):
        mean_exit, precision = reference_exit(adapter, states, maps, row[0], row.mapping)
        assert row.mean_exit_layer == pytest.approx(mean_exit)
        assert row.layers_saved == pytest.approx(L - mean_exit)
        assert row[4] == pytest.approx(precision)
    # the rule is exercised, not just the ends
    assert ((df.mean_exit_layer > 1) & (df.mean_exit_layer < L)).any()
    only_id = early_exit(adapter, states, None, lambdas, mapping="id")
    pd.testing.assert_frame_equal(only_id, df[df.mapping == "id"].reset_index(drop=True))
