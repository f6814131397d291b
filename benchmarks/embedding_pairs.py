"""Exact top-50 W_VO token pairs of one head without the V x V matrix: peak memory and time.

Random weights of GPT-2-small shape (V = 50,257, d = 768, 12 heads of 64). Each method runs in its own
process so that its peak RSS (``ru_maxrss``) is its own:

* ``blockwise``: :func:`fflayers.embedding_space.top_pairs` on the head's rank-64 factors, as
  :func:`~fflayers.embedding_space.head_pairs` runs it, at the full vocabulary (goal: peak RSS <= 1 GB;
  the dense matrix alone would be 50,257^2 * 4 B = 10.1 GB);
* ``dense``: ``E W E^T`` materialised, then ``topk``, at a vocabulary small enough to fit (``--dense_vocab``),
  and ``blockwise`` at the same vocabulary, for the time per entry side by side.

    python benchmarks/embedding_pairs.py [--vocab 50257] [--dense_vocab 12000] [--n 50] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_run(method: str, vocab: int, d: int, d_head: int, n: int, seed: int) -> dict:
    from fflayers.embedding_space import top_pairs

    g = torch.Generator().manual_seed(seed)
    E = torch.randn(vocab, d, generator=g) * 0.02
    W_V, W_O = torch.randn(d, d_head, generator=g) * 0.02, torch.randn(d_head, d, generator=g) * 0.02
    W = W_V @ W_O
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if method == "dense":
        M = E @ W @ E.T
        vals, idx = M.reshape(-1).topk(n)
        rows, cols = idx // vocab, idx % vocab
    else:  # what head_pairs does: the rank-d_head factors E W_V and E W_O^T, then blockwise top-N
        rows_side, cols_side = E @ W_V, E @ W_O.T
        vals, rows, cols = top_pairs(rows_side, torch.eye(W_V.shape[1]), cols_side, n)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "vocab": vocab, "seconds": seconds, "peak_rss_gb": peak / 1e9,
            "inputs_rss_gb": base / 1e9, "entries": vocab * vocab,
            "top": [int(rows[0]), int(cols[0]), float(vals[0])]}


def in_subprocess(method: str, vocab: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--vocab", str(vocab), "--n", str(args.n),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=50_257)
    p.add_argument("--dense_vocab", type=int, default=12_000)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--d_head", type=int, default=64)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(one_run(args.child, args.vocab, args.d, args.d_head, args.n, seed=0)))
        return
    full = in_subprocess("blockwise", args.vocab, args)
    small_b = in_subprocess("blockwise", args.dense_vocab, args)
    small_d = in_subprocess("dense", args.dense_vocab, args)
    assert small_b["top"][:2] == small_d["top"][:2], "blockwise and dense disagree on the top pair"
    print(f"blockwise, V={args.vocab}: {full['seconds']:.1f} s, peak RSS {full['peak_rss_gb']:.2f} GB "
          f"(of which {full['inputs_rss_gb']:.2f} GB before the search: torch and the inputs) "
          f"(goal <= 1 GB; the dense matrix alone: {args.vocab**2 * 4 / 1e9:.1f} GB)")
    for r in (small_b, small_d):
        print(f"{r['method']:>9}, V={r['vocab']}: {r['seconds']:.2f} s, "
              f"{1e9 * r['seconds'] / r['entries']:.2f} ns/entry, peak RSS {r['peak_rss_gb']:.2f} GB")
    print(f"ratio at V={args.dense_vocab}: "
          f"time blockwise/dense {small_b['seconds'] / small_d['seconds']:.2f}, "
          f"peak RSS blockwise/dense {small_b['peak_rss_gb'] / small_d['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
