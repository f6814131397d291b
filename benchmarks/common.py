"""Shared pieces of the benchmark scripts: corpora, models, interleaved timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fflayers.backends.base import LMAdapter

DEMO_DIR = Path("runs/demo")


def demo_sentences(adapter: LMAdapter, n: int, corpus: str | None = None, seed: int = 0) -> list[list[int]]:
    """Token ids of ``n`` sentences: from a WikiText-format file when given (or the demo corpus), else
    synthetic."""
    from fflayers.data import read_corpus, shuffled_sentences

    path = Path(corpus) if corpus else DEMO_DIR / "corpus" / "wiki.valid.tokens"
    if path.is_file():
        lines = read_corpus(path)
        pretok = path.suffix == ".tokens"
        sents = shuffled_sentences(lines, seed=seed, max_sentences=n, pretokenized=pretok)
        limit = (adapter.max_positions or 10**9) - 2
        return [adapter.vocab.tokenize(s)[:limit] for s in sents]
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 40, (n,), generator=g)
    return [torch.randint(5, adapter.vocab_size, (int(k),), generator=g).tolist() for k in lengths]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, alternating them ``repeats`` times so noise hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
