"""Seconds per prompt of integrated gradients over every layer (20 steps) on a random GPT-2-small-shaped
model: all (layer, alpha) rows batched (fflayers) vs one layer at a time with the full LM head, as the
knowledge-neurons package does; prints the ratio (goal >= 5) and the largest difference of the scores.

    python benchmarks/integrated_gradients.py [--prompts 2] [--steps 20] [--package_batch 10] [--repeats 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fflayers.backends.hf import HFAdapter  # noqa: E402
from fflayers.neurons import KnowledgeNeurons  # noqa: E402


def gpt2_small(device: str) -> HFAdapter:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=12, n_embd=768, n_inner=3072, n_head=12, resid_pdrop=0, embd_pdrop=0,
                     attn_pdrop=0)
    return HFAdapter(GPT2LMHeadModel(cfg).eval(), device=device)


def layer_by_layer(adapter: HFAdapter, ids: torch.Tensor, target: int, steps: int,
                   batch: int) -> torch.Tensor:
    """The package's loop: per layer, a baseline pass, then ``steps / batch`` passes of ``batch`` scaled
    copies of that layer's pre-activation fc output at the last position, gradients of the full-head
    softmax."""
    model, out = adapter.model, []
    alphas = torch.linspace(0, 1, steps, device=adapter.device)[:, None]
    for block in model.transformer.h:
        seen = {}
        handle = block.mlp.c_fc.register_forward_hook(
            lambda m, a, o, seen=seen: seen.update(a=o[0, -1].detach()))
        with torch.no_grad():
            model(input_ids=ids)
        handle.remove()
        grads = torch.zeros_like(seen["a"])
        for chunk in (seen["a"] * alphas).split(batch):
            x = chunk.clone().requires_grad_(True)

            def patch(m, a, o, x=x):
                o = o.clone()
                o[:, -1] = x
                return o

            handle = block.mlp.c_fc.register_forward_hook(patch)
            logits = model(input_ids=ids.expand(x.shape[0], -1)).logits
            handle.remove()
            probs = torch.softmax(logits[:, -1], dim=-1)[:, target]
            grads += torch.autograd.grad(probs.sum(), x)[0].sum(0)
        out.append(seen["a"] * grads / steps)
    return torch.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=10, help="prompt length")
    p.add_argument("--package_batch", type=int, default=10, help="alphas per pass in the layer-by-layer loop")
    p.add_argument("--batch_size", type=int, default=None,
                   help="rows per pass of the batched run (all by default)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    adapter = gpt2_small(args.device)
    kn = KnowledgeNeurons(adapter, convention="kn-package")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, adapter.vocab_size, (args.tokens + 1,), generator=g).tolist()
               for _ in range(args.prompts)]
    rows = args.batch_size or adapter.n_layers * args.steps

    def batched():
        return [kn.get_scores(q[:-1], q[-1:], batch_size=rows, steps=args.steps) for q in prompts]

    def package():
        return [layer_by_layer(adapter, torch.tensor([q[:-1]], device=adapter.device), q[-1], args.steps,
                               args.package_batch) for q in prompts]

    with torch.no_grad():  # warm-up
        adapter.run(torch.tensor([prompts[0]], device=adapter.device))
    results: dict[str, list[torch.Tensor]] = {}
    t = {"batched": [], "package": []}
    for _ in range(args.repeats):  # alternating, so that noise hits both alike
        for name, fn in (("batched", batched), ("package", package)):
            t0 = time.perf_counter()
            results[name] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t[name].append(time.perf_counter() - t0)
    t = {k: statistics.median(v) for k, v in t.items()}
    diff = max(float((a - b).abs().max() / b.abs().max())
               for a, b in zip(results["batched"], results["package"], strict=True))
    n = len(prompts)
    print(f"GPT-2-small shape, random weights, {args.tokens}-token prompts, {args.steps} steps, "
          f"{adapter.n_layers} layers, {args.device}")
    print(f"batched ({rows} rows per pass): {t['batched'] / n:.2f} s/prompt | layer by layer "
          f"(batch {args.package_batch}, full head): {t['package'] / n:.2f} s/prompt | "
          f"ratio {t['package'] / t['batched']:.2f} (goal >= 5) | max relative score difference {diff:.1e}")


if __name__ == "__main__":
    main()
