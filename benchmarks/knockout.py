"""Attention knockout sweep (all layers x subject / non-subject / last, window k = 9) on SmolLM2: facts per
second of the implementation (many fact x layer x set rows per forward, per-row edge masks, each fact's
positions before the last cached once so that a row runs one position) vs one fact and one (layer, set)
forward at a time; the batched run without the prefix cache beside them. Prints the ratios (goal >= 20 for
the cached run over one at a time, its p_new equal to the whole-prompt run's to 1e-5 absolute) and exits 1
below the goal.

    python benchmarks/knockout.py [--facts 4] [--batch_size 128] [--device auto]

Facts are SmolLM2's correctly predicted country -> capital prompts (the Debian countries list).
"""

from __future__ import annotations

import argparse
import time

import torch

from fflayers.hooks import block_attention
from fflayers.recall import (
    DEFAULT_SETS,
    attention_knockout,
    countries_facts,
    encode_facts,
    filter_facts,
    knockout_position_sets,
    layer_window,
)


@torch.inference_mode()
def one_at_a_time(adapter, encoded, window: int = 9) -> list[float]:
    """The straightforward loop: per fact, per layer, per set, one forward of one sequence."""
    out = []
    for item in encoded:
        ids = torch.tensor([item.ids], device=adapter.device)
        lp = adapter.log_probs(ids)[0, -1]
        target = int(lp.argmax())
        sets = knockout_position_sets(item)
        T = len(item.ids)
        for layer in range(adapter.n_layers):
            lo, hi = layer_window(layer, window, adapter.n_layers)
            for name in DEFAULT_SETS:
                mask = torch.zeros(T, T, dtype=torch.bool)
                mask[T - 1, sets[name]] = True
                with block_attention(adapter, {j: mask for j in range(lo, hi + 1)}):
                    out.append(float(adapter.log_probs(ids)[0, -1, target].exp()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--facts", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=128, help="rows per forward of the batched run")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    from fflayers.assets import load_smollm2

    adapter = load_smollm2(device=args.device)
    encoded, _ = encode_facts(adapter, countries_facts()[:60])
    known = filter_facts(adapter, encoded)[: args.facts]
    n = len(known)
    attention_knockout(adapter, known[:1], layers=[0],
                       batch_size=args.batch_size)  # warm-up (edge-blocking set-up)
    t0 = time.perf_counter()
    table = attention_knockout(adapter, known, window=9, batch_size=args.batch_size)
    cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    uncached = attention_knockout(adapter, known, window=9, batch_size=args.batch_size, prefix_cache=False)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop = torch.tensor(one_at_a_time(adapter, known), dtype=torch.float64)
    single = time.perf_counter() - t0
    got, whole = torch.tensor(table["p_new"].values), torch.tensor(uncached["p_new"].values)
    diff, rel = float((got - whole).abs().max()), float(((got - whole).abs() / whole).max())
    diff_loop = float((whole - loop).abs().max())
    ratio = single / cached
    print(f"SmolLM2 knockout sweep ({adapter.n_layers} layers x {len(DEFAULT_SETS)} sets, k=9, {n} facts, "
          f"{adapter.device}): prefix-cached {n / cached:.3f} facts/s | batched, whole prompts "
          f"{n / batched:.3f} facts/s | one at a time {n / single:.3f} facts/s")
    print(f"ratio cached / one at a time {ratio:.1f} (goal >= 20) | batched whole prompts / one at a time "
          f"{single / batched:.1f} | max |p_new difference| cached vs whole prompts {diff:.1e} "
          f"(goal <= 1e-5; relative {rel:.1e}), whole prompts vs one at a time {diff_loop:.1e}")
    if ratio < 20 or diff > 1e-5:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
