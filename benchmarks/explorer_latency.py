"""The explorer's latency on SmolLM2 (CPU by default), side by side in one run, every request through the
live server (HTTP on loopback):

1. a trace request (k = 10, the logit lens, every layer's three readings) vs the library's bare forward
   with the three states captured and one projection of them all (goal: ratio <= 1.3);
2. a token search over all 30 x 1536 = 46,080 values (the demo's export, or computed once; goal: median
   <= 50 ms);
3. a trace request with 20 interventions as the page sends it (the unedited run of that prompt traced
   just before) vs a request without any on a new prompt (goal: <= 1.2x); the first request of a new
   prompt with 20 interventions (both runs computed) is printed too.

    python benchmarks/explorer_latency.py [--repeats 10] [--searches 50] [--values runs/demo/...parquet]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEMO_DIR, interleaved  # noqa: E402

from fflayers.embedding_space.value_index import ValueIndex  # noqa: E402
from fflayers.explore import Explorer, serve_in_thread  # noqa: E402
from fflayers.hooks import capture  # noqa: E402

PROMPTS = ["The capital of France is the city of", "The Eiffel Tower is located in the city of",
           "Water is made of hydrogen and", "The author of Hamlet was the English playwright"]


def load_model(device: str):
    """SmolLM2: the demo's plain copy when there is one (fast to load), else the packaged GGUF file."""
    from fflayers.assets import load_smollm2
    from fflayers.backends.hf import load_hf_lm

    dev = None if device == "auto" else device
    plain = DEMO_DIR / "smollm2"
    return load_hf_lm(str(plain), device=dev) if (plain / "config.json").is_file() else load_smollm2(dev)


def bare_trace(adapter, ids: torch.Tensor, k: int = 10) -> torch.Tensor:
    """The floor: one forward with resid_pre / attn_out / resid_post captured, one projection of the 3L
    states at the last position, their top-k."""
    with torch.no_grad(), capture(adapter, ["resid_pre", "attn_out", "resid_post"]) as c:
        adapter.log_probs(ids)
        rows = []
        for layer in range(adapter.n_layers):
            pre = c["resid_pre", layer][0, -1]
            rows += [pre, pre + c["attn_out", layer][0, -1], c["resid_post", layer][0, -1]]
        return adapter.project(torch.stack(rows).float()).topk(k).indices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--searches", type=int, default=50)
    p.add_argument("--values", type=Path, default=DEMO_DIR / "embedding_space" / "smollm2_values.parquet",
                   help="the embedding-space export (default: the demo's; computed when missing)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    import httpx

    torch.manual_seed(0)
    adapter = load_model(args.device)
    t0 = time.perf_counter()
    values = ValueIndex(adapter, args.values if args.values.is_file() else None)
    values.ensure()
    print(f"value index: {adapter.n_layers * adapter.d_ff} values, "
          f"{'read from ' + str(args.values) if args.values.is_file() else 'computed'} in "
          f"{time.perf_counter() - t0:.1f} s")
    explorer = Explorer(adapter, name="SmolLM2-135M", values=values)
    rng = random.Random(0)
    ivs = [{"kind": "value", "layer": rng.randrange(adapter.n_layers), "dim": rng.randrange(adapter.d_ff),
            "op": "off"} for _ in range(20)]
    fresh = iter(f"{PROMPTS[i % len(PROMPTS)]}{' and' * (i // len(PROMPTS))}" for i in range(10**6))

    with serve_in_thread(explorer) as base, httpx.Client(base_url=base, timeout=120) as client:
        def post(body: dict) -> dict:
            r = client.post("/api/trace", json=body)
            r.raise_for_status()
            return r.json()

        prompt = PROMPTS[0]
        ids = torch.tensor([adapter.vocab.tokenize(prompt)], device=adapter.device)
        state = {"prompt": None}

        def request_new_prompt():   # a new prompt: nothing cached
            state["prompt"] = next(fresh)
            post({"prompt": state["prompt"], "k": 10})

        def request_edited():       # the page's next request: the same prompt, now under the interventions
            post({"prompt": state["prompt"], "k": 10, "interventions": ivs})

        def request_new_edited():   # a new prompt and 20 interventions at once: both runs computed
            post({"prompt": next(fresh), "k": 10, "interventions": ivs})

        t = interleaved({"bare": lambda: bare_trace(adapter, ids), "trace": request_new_prompt,
                         "edited": request_edited, "new_edited": request_new_edited}, args.repeats)
        print(f"trace request {t['trace'] * 1e3:.0f} ms vs bare forward + projection of every layer "
              f"{t['bare'] * 1e3:.0f} ms | ratio {t['trace'] / t['bare']:.2f} (goal <= 1.3)")
        print(f"20 interventions (page flow) {t['edited'] * 1e3:.0f} ms vs none {t['trace'] * 1e3:.0f} ms | "
              f"ratio {t['edited'] / t['trace']:.2f} (goal <= 1.2); a new prompt with 20 interventions "
              f"(unedited and edited runs) {t['new_edited'] * 1e3:.0f} ms "
              f"({t['new_edited'] / t['trace']:.2f}x)")

        sample = rng.sample(range(1000, adapter.vocab_size), args.searches)
        tokens = adapter.vocab.id_to_token(sample)
        client.get("/api/search", params={"token": tokens[0]})   # warm-up
        times, hits = [], 0
        for tok in tokens:
            t0 = time.perf_counter()
            r = client.get("/api/search", params={"token": tok, "limit": 50})
            times.append(time.perf_counter() - t0)
            if r.status_code == 200:
                hits += bool(r.json()["results"])
        print(f"search over {adapter.n_layers * adapter.d_ff} values: median "
              f"{statistics.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms over {len(tokens)} "
              f"tokens ({hits} with hits) (goal: median <= 50 ms)")


if __name__ == "__main__":
    main()
