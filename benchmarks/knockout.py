"""Attention knockout sweep (all layers x subject / non-subject / last, window k = 9) on SmolLM2: facts per
second of the batched implementation (many fact x layer x set rows per forward, per-row edge masks) vs one
fact and one (layer, set) forward at a time; prints the ratio (goal >= 5 on CPU).

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
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop = one_at_a_time(adapter, known)
    single = time.perf_counter() - t0
    diff = (torch.tensor(table["p_new"].values) - torch.tensor(loop, dtype=torch.float64)).abs().max()
    print(f"SmolLM2 knockout sweep ({adapter.n_layers} layers x {len(DEFAULT_SETS)} sets, k=9, {n} facts, "
          f"{adapter.device}): batched {n / batched:.3f} facts/s | one at a time {n / single:.3f} facts/s | "
          f"ratio {single / batched:.1f} (goal >= 5) | max |p_new difference| {diff:.2e}")


if __name__ == "__main__":
    main()
