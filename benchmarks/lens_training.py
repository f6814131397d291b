"""Lenses on SmolLM2, side by side in one run:

1. tuned-lens training throughput (tokens/s of one training step over every layer) vs the frozen model's
   forward alone over the same tokens (goal: ratio <= 1.3; the forward is the floor);
2. evaluation of the logit, mat, tuned and hybrid lenses over N positions vs one forward over them (goal:
   <= 2x), and the Patchscope's own forwards apart.

    python benchmarks/lens_training.py [--sentences 8] [--repeats 2] [--layers 0 10 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_sentences, interleaved  # noqa: E402

from fflayers.data.batching import pad_right  # noqa: E402
from fflayers.lenses import (  # noqa: E402
    LensTrainConfig,
    LinearShortcutLens,
    LogitLens,
    TokenIdentityPatchscope,
    TunedLens,
    evaluate_lenses,
    train_lens,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", type=int, nargs="*", default=None,
                   help="translators trained / states evaluated (default: all)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    from fflayers.assets import load_smollm2

    adapter = load_smollm2(device=None if args.device == "auto" else args.device)
    seqs = demo_sentences(adapter, args.sentences)
    n_tokens = sum(map(len, seqs))
    ids, mask = pad_right(seqs, adapter.vocab.pad_id or 0)
    layers = args.layers
    config = LensTrainConfig(steps=1, tokens_per_step=n_tokens, batch_tokens=10**9, layers=tuple(layers)
                             if layers else None)

    @torch.no_grad()
    def forward():
        adapter.run(ids, mask)

    def train_step():
        train_lens(adapter, seqs, config, progress=False)

    t = interleaved({"forward": forward, "train": train_step}, args.repeats)
    n_layers = len(layers) if layers else adapter.n_layers
    print(f"SmolLM2: {n_tokens} tokens | forward {n_tokens / t['forward']:.0f} tok/s | one tuned-lens step "
          f"over {n_layers} translators {n_tokens / t['train']:.0f} tok/s | ratio "
          f"{t['train'] / t['forward']:.2f} (goal <= 1.3)")

    L, d = adapter.n_layers, adapter.d_model
    maps = {(L, layer): torch.eye(d) for layer in range(L)}
    vector = {"logit": LogitLens(adapter), "mat": LinearShortcutLens(adapter, maps),
              "tuned": TunedLens(adapter), "hybrid": TunedLens.from_shortcuts(adapter, maps)}
    eval_layers = layers if layers else None

    def evaluate():
        evaluate_lenses(adapter, vector, seqs, eval_layers, progress=False)

    def patchscope():
        evaluate_lenses(adapter, {"patchscope": TokenIdentityPatchscope(adapter)}, seqs, eval_layers,
                        positions="random", progress=False)

    t = interleaved({"forward": forward, "evaluate": evaluate, "patchscope": patchscope}, args.repeats)
    print(f"SmolLM2: 4 vector lenses x {len(eval_layers) if eval_layers else L + 1} states over {n_tokens} "
          f"tokens {t['evaluate']:.2f} s vs one forward {t['forward']:.2f} s | ratio "
          f"{t['evaluate'] / t['forward']:.1f} (goal <= 2) | Patchscope, one position per sentence: "
          f"{t['patchscope']:.2f} s")


if __name__ == "__main__":
    main()
