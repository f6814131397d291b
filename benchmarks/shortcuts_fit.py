"""All linear shortcut maps of a GPT-2-small-shaped set of states: Gram accumulation vs sklearn per pair.

Random correlated states (13 states, d = 768, 9,000 positions by default; each state a noisy random linear
function of the previous one), generated batch by batch from fixed seeds so both methods see the same data.
Each method runs in its own process so that its peak RSS (``ru_maxrss``) is its own:

* ``gram``: :class:`fflayers.shortcuts.GramAccumulator` fed batch by batch (the stacked data never exists),
  then :func:`fflayers.shortcuts.fit_maps` for all pairs i < j;
* ``sklearn``: the data stacked as ``[states, positions, d]`` float32 arrays, then
  ``LinearRegression(fit_intercept=False)`` per pair, keeping every ``coef_`` (as fit_maps keeps every map).

Times cover the fitting only (not the data generation). Goal: gram >= 10x faster, <= 1/5 of the peak memory.

    python benchmarks/shortcuts_fit.py [--positions 9000] [--states 13] [--d 768] [--batch 256] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def batches(args):
    """Yield ``[b, states, d]`` float32 batches; batch k depends only on (seed, k)."""
    g = torch.Generator().manual_seed(args.seed)
    d = args.d
    scale = torch.logspace(-1, 1, d)
    mix = [0.5 * torch.randn(d, d, generator=g) / d**0.5 for _ in range(args.states - 1)]
    for k, start in enumerate(range(0, args.positions, args.batch)):
        b = min(args.batch, args.positions - start)
        gk = torch.Generator().manual_seed(args.seed * 1_000_003 + k + 1)
        x = torch.randn(b, d, generator=gk) * scale
        out = [x]
        for M in mix:
            x = x + x @ M + 0.5 * torch.randn(b, d, generator=gk)
            out.append(x)
        yield torch.stack(out, dim=1)


def run_gram(args) -> tuple[float, dict]:
    from fflayers.shortcuts import GramAccumulator, fit_maps

    acc = GramAccumulator(args.states, args.d)
    seconds = 0.0
    for states in batches(args):
        t0 = time.perf_counter()
        acc.update(states)
        seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    maps = fit_maps(acc)
    seconds += time.perf_counter() - t0
    return seconds, {key: A.numpy() for key, A in maps.items()}


def run_sklearn(args) -> tuple[float, dict]:
    from sklearn.linear_model import LinearRegression

    X = np.empty((args.states, args.positions, args.d), dtype=np.float32)
    done = 0
    for states in batches(args):
        X[:, done : done + states.shape[0]] = states.numpy().transpose(1, 0, 2)
        done += states.shape[0]
    maps = {}
    t0 = time.perf_counter()
    for i in range(args.states):
        for j in range(i + 1, args.states):
            maps[j, i] = LinearRegression(fit_intercept=False).fit(X[i], X[j]).coef_.astype(np.float32)
    return time.perf_counter() - t0, maps


def child(args) -> dict:
    import sklearn.linear_model  # noqa: F401 - imports count in the start RSS, not in the fit

    import fflayers.shortcuts  # noqa: F401

    start = rss_gb()
    seconds, maps = (run_gram if args.child == "gram" else run_sklearn)(args)
    peak = rss_gb()
    last = (args.states - 1, 0)
    np.save(Path(args.out) / f"{args.child}_first.npy", maps[1, 0])
    np.save(Path(args.out) / f"{args.child}_last.npy", maps[last])
    return {"method": args.child, "seconds": seconds, "peak_rss_gb": peak, "start_rss_gb": start,
            "maps": len(maps)}


def in_subprocess(method: str, args, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--out", out, "--positions", str(args.positions),
           "--states", str(args.states), "--d", str(args.d), "--batch", str(args.batch), "--seed",
           str(args.seed), "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", type=int, default=9000)
    p.add_argument("--states", type=int, default=13)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--batch", type=int, default=256, help="rows per GramAccumulator.update")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return
    n_pairs = args.states * (args.states - 1) // 2
    print(f"{args.positions} positions, {args.states} states, d = {args.d}: {n_pairs} maps; "
          f"stacked float32 data {args.positions * args.states * args.d * 4 / 1e9:.2f} GB, "
          f"Gram blocks float64 {args.states * (args.states + 1) // 2 * args.d**2 * 8 / 1e9:.2f} GB, "
          f"maps float32 {n_pairs * args.d**2 * 4 / 1e9:.2f} GB")
    with tempfile.TemporaryDirectory() as out:
        res = {m: in_subprocess(m, args, out) for m in ("gram", "sklearn")}
        diff = max(rel(np.load(f"{out}/gram_{k}.npy"), np.load(f"{out}/sklearn_{k}.npy"))
                   for k in ("first", "last"))
    for r in res.values():
        print(f"{r['method']:>8}: {r['seconds']:7.2f} s, peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(at start: {r['start_rss_gb']:.2f} GB, so {r['peak_rss_gb'] - r['start_rss_gb']:.2f} GB for "
              "the fit)")
    g, s = res["gram"], res["sklearn"]
    print(f"gram vs sklearn: {s['seconds'] / g['seconds']:.1f}x faster (goal >= 10x); peak RSS ratio "
          f"{g['peak_rss_gb'] / s['peak_rss_gb']:.2f} (goal <= 0.20), above start "
          f"{(g['peak_rss_gb'] - g['start_rss_gb']) / (s['peak_rss_gb'] - s['start_rss_gb']):.2f}; "
          f"maps agree to {diff:.1e} (relative Frobenius, pairs (1, 0) and ({args.states - 1}, 0))")


if __name__ == "__main__":
    main()
