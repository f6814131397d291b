"""Trigger mining (all keys, k=50) vs a bare forward pass over the same batches; prints the wall-time ratio
(goal <= 1.2) for a fairseq LM and for SmolLM2-135M.

The bare forward is ``adapter.run`` on the same length-bucketed batches, stopped after the last layer; mining
is :func:`fflayers.memories.trigger_examples` (hooks on every layer's keys, max/argmax over positions, top-k
merge). Repeats alternate between the two so that machine noise hits both alike; medians are compared (wall
time; the CPU-time ratio is printed too, as a check on machines shared with other work).

    python benchmarks/trigger_mining.py [--model_dir runs/demo/fairseq_lm] [--corpus wiki.valid.tokens] \
        [--sentences 200] [--smollm2_sentences 32] [--repeats 3] [--min_time 10] [--batch_tokens 4096] \
        [--device auto]

Without ``--model_dir`` the demo LM (``runs/demo/fairseq_lm``) is used when present, else a small fairseq LM
(4 layers, d=256, d_ff=1024) is trained for a few updates with the real fairseq CLIs (its weights do not
matter for timing). Without ``--corpus`` the demo corpus is used when present, else random token ids.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEMO_DIR, demo_sentences  # noqa: E402

from fflayers.backends.base import LMAdapter  # noqa: E402
from fflayers.data import make_batches  # noqa: E402
from fflayers.hooks import StopForward, hooked  # noqa: E402
from fflayers.memories import trigger_examples  # noqa: E402


def measure(name: str, adapter: LMAdapter, sentences: list[list[int]], repeats: int, batch_tokens: int,
            k: int, min_time: float = 10.0) -> float:
    limit = adapter.max_positions
    batches = make_batches(sentences, adapter.vocab.pad_id, batch_tokens=batch_tokens, max_length=limit,
                           truncate=True)
    n_tokens = sum(int(b.attention_mask.sum()) for b in batches)
    last = adapter.n_layers - 1

    def stop(_x):
        raise StopForward

    def bare():
        with hooked(adapter, [("resid_post", last, stop)]), torch.inference_mode():
            for b in make_batches(sentences, adapter.vocab.pad_id, batch_tokens=batch_tokens,
                                  max_length=limit, truncate=True):
                adapter.run(b.input_ids, b.attention_mask)

    def mining():
        return trigger_examples(adapter, sentences, k=k, batch_tokens=batch_tokens, progress=False)

    t0 = time.perf_counter()
    bare()
    mining()
    once = time.perf_counter() - t0  # also a warm-up
    repeats = max(repeats, math.ceil(min_time / max(once, 1e-9)))  # small models: more repeats, less noise
    t, cpu = interleaved_wall_cpu({"forward": bare, "mining": mining}, repeats)
    ratio = t["mining"] / t["forward"]
    n_keys = adapter.n_layers * adapter.d_ff
    print(f"{name}: {len(sentences)} sentences, {n_tokens} tokens in {len(batches)} batches, {n_keys} keys, "
          f"k={k} | forward {t['forward']:.2f} s ({n_tokens / t['forward']:.0f} tok/s) "
          f"| mining {t['mining']:.2f} s | ratio {ratio:.3f} (goal <= 1.2; median of {repeats}; "
          f"CPU-time ratio {cpu['mining'] / cpu['forward']:.3f})",
          flush=True)
    return ratio


def interleaved_wall_cpu(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time and median process CPU time of each function, alternating them ``repeats`` times
    (CPU time is less sensitive to other processes competing for the cores)."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return ({k: statistics.median(v) for k, v in wall.items()},
            {k: statistics.median(v) for k, v in cpu.items()})


def _synthetic_text(path: Path, n_lines: int, seed: int) -> None:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(400)] + ["the", "a", "of", "and", "in", "."]
    path.write_text("".join(" " + " ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + " .\n"
                            for _ in range(n_lines)), encoding="utf-8")


def train_small_lm(workdir: Path, corpus: str | None) -> Path:
    """A 4-layer, d=256 adaptive-input LM trained for a few updates (timing only)."""
    from fflayers import fairseq_tools

    text = workdir / "text"
    text.mkdir()
    if corpus and Path(corpus).is_file():
        train = Path(corpus)
    else:
        train = text / "train.tokens"
        _synthetic_text(train, 2000, seed=0)
    valid = text / "valid.tokens"
    _synthetic_text(valid, 50, seed=1)
    data_bin = fairseq_tools.preprocess(train, valid, None, workdir / "data-bin")
    return fairseq_tools.train_lm(data_bin, workdir / "model", adaptive=True, layers=4, dim=256, ffn_dim=1024,
                                  heads=4, max_update=3, tokens_per_sample=128, dropout=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=None,
                   help="fairseq model dir (default: the demo LM, else train a small one)")
    p.add_argument("--corpus", default=None,
                   help="WikiText-format .tokens file (default: demo corpus or random ids)")
    p.add_argument("--sentences", type=int, default=200, help="sentences for the fairseq LM")
    p.add_argument("--smollm2_sentences", type=int, default=32, help="sentences for SmolLM2")
    p.add_argument("--repeats", type=int, default=3, help="at least this many timed repeats per model")
    p.add_argument("--min_time", type=float, default=10.0, help="more repeats until about this many seconds")
    p.add_argument("--batch_tokens", type=int, default=4096)
    p.add_argument("-k", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--skip_fairseq", action="store_true")
    p.add_argument("--skip_smollm2", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = {}

    if not args.skip_fairseq:
        from fflayers.backends.fairseq_loading import load_fairseq_lm

        with tempfile.TemporaryDirectory() as tmp:
            model_dir = args.model_dir or str(DEMO_DIR / "fairseq_lm")
            name = f"fairseq LM ({model_dir})"
            if not Path(model_dir, "dict.txt").is_file():
                if args.model_dir:
                    sys.exit(f"no fairseq model dir at {args.model_dir}")
                print("no demo LM at runs/demo/fairseq_lm: training a small one (timing only) ...",
                      flush=True)
                model_dir = str(train_small_lm(Path(tmp), args.corpus))
                name = "fairseq LM (4 layers, d=256, d_ff=1024, adaptive)"
            adapter = load_fairseq_lm(model_dir, device=args.device)
            sents = demo_sentences(adapter, args.sentences, args.corpus)
            ratios["fairseq"] = measure(name, adapter, sents, args.repeats, args.batch_tokens, args.k,
                                        args.min_time)
            del adapter
    if not args.skip_smollm2:
        from fflayers.assets import load_smollm2

        adapter = load_smollm2(device=args.device)
        sents = demo_sentences(adapter, args.smollm2_sentences, args.corpus)
        ratios["smollm2"] = measure("SmolLM2-135M", adapter, sents, args.repeats, args.batch_tokens, args.k,
                                    args.min_time)
    print(" | ".join(f"{k}: {v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
