"""Tokens/s of a bare forward vs a forward that captures every FFN hook point (mlp_key, mlp_coef, mlp_out)
of every layer; prints the ratio (goal <= 1.1) for the demo fairseq LM and for SmolLM2.

    python benchmarks/forward_overhead.py [--model_dir runs/demo/fairseq_lm] [--sentences 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEMO_DIR, demo_sentences, interleaved  # noqa: E402

from fflayers.backends.base import LMAdapter  # noqa: E402
from fflayers.data import make_batches  # noqa: E402
from fflayers.hooks import capture  # noqa: E402


def measure(name: str, adapter: LMAdapter, n_sentences: int, repeats: int, batch_tokens: int) -> float:
    sents = demo_sentences(adapter, n_sentences)
    batches = [b.to(adapter.device)
               for b in make_batches(sents, adapter.vocab.pad_id, batch_tokens=batch_tokens)]
    n_tokens = sum(int(b.attention_mask.sum()) for b in batches)

    @torch.inference_mode()
    def bare():
        for b in batches:
            adapter.run(b.input_ids, b.attention_mask)

    @torch.inference_mode()
    def captured():
        with capture(adapter, ["mlp_key", "mlp_coef", "mlp_out"]) as cache:
            for b in batches:
                adapter.run(b.input_ids, b.attention_mask)
        return cache

    t = interleaved({"bare": bare, "capture": captured}, repeats)
    ratio = t["capture"] / t["bare"]
    print(f"{name}: {n_tokens} tokens in {len(batches)} batches | bare {n_tokens / t['bare']:.0f} tok/s | "
          f"capture all FFN hooks {n_tokens / t['capture']:.0f} tok/s | ratio {ratio:.3f} (goal <= 1.1)")
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=str(DEMO_DIR / "fairseq_lm"),
                   help="fairseq model dir (demo LM by default)")
    p.add_argument("--sentences", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch_tokens", type=int, default=2048)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip_smollm2", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)

    if Path(args.model_dir).is_dir():
        from fflayers.backends.fairseq_loading import load_fairseq_lm

        measure("fairseq demo LM", load_fairseq_lm(args.model_dir, device=args.device), args.sentences,
                args.repeats, args.batch_tokens)
    else:
        print(f"no fairseq model at {args.model_dir}: run `make demo` first (skipped)")
    if not args.skip_smollm2:
        from fflayers.assets import load_smollm2

        measure("SmolLM2-135M", load_smollm2(device=args.device), args.sentences, args.repeats,
                args.batch_tokens)


if __name__ == "__main__":
    main()
