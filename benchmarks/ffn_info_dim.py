"""Dim-mode ffn info: vectorized :func:`extract_ffn_info` vs the original per-example, per-dim loop; prints
the ratio.

The reference (:mod:`reference_dim_loop`) runs the model once per sentence and projects every ``m_i v_i`` on
its own. It is timed on ``--ref_sentences`` sentences and ``--ref_dims`` dims per layer and extrapolated
linearly to all sentences and all dims (said so in the output); its results are compared with the vectorized
table on that subset. The vectorized path is timed on all ``--sentences`` sentences, all layers and all dims,
with its exact head shortcut (when the model has one) and, with ``--general``, without it. Goal: ratio >= 200.

    python benchmarks/ffn_info_dim.py [--model_dir runs/demo/fairseq_lm | --hf_tiny gpt2 | --random_fairseq]
        [--wiki103_random] [--sentences 512] [--ref_sentences 4] [--ref_dims 64] [--general] [--threads 1]

Default model: the demo LM (``runs/demo/fairseq_lm``) when present, else a randomly initialised fairseq
adaptive-softmax LM (4 layers, d=256, d_ff=1024, 32,000 words; its weights do not matter for timing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from agreement_memory import build_random_fairseq_lm  # noqa: E402
from common import DEMO_DIR, demo_sentences  # noqa: E402
from reference_dim_loop import reference_dim_mode  # noqa: E402

from fflayers.memories.ffn_info import extract_ffn_info  # noqa: E402


def load(args):
    if args.wiki103_random:
        return build_random_fairseq_lm(), "random fairseq LM of the WikiText-103 shape"
    if args.hf_tiny:
        from fflayers.backends.hf import HFAdapter
        from tests.fixtures.hf_models import tiny_model

        return HFAdapter(tiny_model(args.hf_tiny), device="cpu"), f"tiny random {args.hf_tiny}"
    model_dir = Path(args.model_dir) if args.model_dir else DEMO_DIR / "fairseq_lm"
    if not args.random_fairseq and (args.model_dir or (model_dir / "dict.txt").is_file()):
        from fflayers.backends.fairseq_loading import load_fairseq_lm

        return load_fairseq_lm(model_dir, device=args.device), str(model_dir)
    adapter = build_random_fairseq_lm(vocab=32_000, layers=4, dim=256, ffn=1024, heads=4,
                                      cutoffs="4000,12000")
    return adapter, "random fairseq adaptive LM (4 x 256, d_ff 1024, 32k words, cutoffs 4000,12000)"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default=None,
                   help="fairseq model dir (default: runs/demo/fairseq_lm if present)")
    p.add_argument("--hf_tiny", default=None, help="a tiny random HF model of this architecture (e.g. gpt2)")
    p.add_argument("--random_fairseq", action="store_true",
                   help="the random fairseq adaptive LM even if the demo exists")
    p.add_argument("--wiki103_random", action="store_true",
                   help="a randomly initialised LM of the WikiText-103 shape (16 x 1024, d_ff 4096, "
                        "267,744 words)")
    p.add_argument("--corpus", default=None,
                   help="WikiText-format text for sentences (default: demo corpus or random ids)")
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--ref_sentences", type=int, default=4)
    p.add_argument("--ref_dims", type=int, default=64, help="dims per layer timed in the reference (0: all)")
    p.add_argument("--general", action="store_true",
                   help="also time the vectorized path without the head shortcut")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy small machine multi-threaded small ops "
                        "stall)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ref_sentences > args.sentences:
        p.error("--ref_sentences must not exceed --sentences")
    adapter, name = load(args)
    sents = demo_sentences(adapter, args.sentences, args.corpus)
    L, d_ff = adapter.n_layers, adapter.d_ff
    print(f"model: {name}: {adapter}; torch threads {torch.get_num_threads()}")
    print(f"sentences: {len(sents)} (mean {np.mean([len(s) for s in sents]):.1f} tokens)")

    extract_ffn_info(adapter, sents[:2], "dim", progress=False)  # warm-up
    vec, t_vec = timed(lambda: extract_ffn_info(adapter, sents, "dim", progress=False))
    n_rows = len(vec["sentence"].unique())
    print(f"vectorized ({vec.attrs['head_shortcut']} head shortcut): {t_vec:.2f} s for {n_rows} sentences x "
          f"{L} layers x {d_ff} dims")
    t_gen = None
    if args.general:
        _, t_gen = timed(lambda: extract_ffn_info(adapter, sents, "dim", progress=False, head_shortcut=False))
        print(f"vectorized (general path, no shortcut): {t_gen:.2f} s")

    ref_dims = d_ff if args.ref_dims <= 0 else min(args.ref_dims, d_ff)
    dims = np.linspace(0, d_ff - 1, ref_dims).round().astype(int).tolist()
    ref_sents = sents[: args.ref_sentences]
    timings: dict = {}
    ref, t_ref_measured = timed(lambda: reference_dim_mode(adapter, ref_sents, dims=dims, timings=timings))
    n_ref = len(ref["sentence"].unique())
    per_sentence_fwd = timings["forward_s"] / max(1, n_ref)
    per_dim = timings["project_s"] / max(1, n_ref * L * len(dims))
    t_ref = n_rows * (per_sentence_fwd + L * d_ff * per_dim)
    extrap = "measured" if (n_ref == n_rows and len(dims) == d_ff) else (
        f"extrapolated from {n_ref} sentence(s) x {len(dims)} of {d_ff} dims per layer")
    print(f"reference loop: {t_ref_measured:.2f} s measured ({timings['n_project']} head calls, "
          f"{1e3 * per_dim:.3f} ms per dim, {per_sentence_fwd:.3f} s forward per sentence); "
          f"{t_ref:.1f} s for the full run ({extrap})")

    # the two agree on the reference subset (up to floating-point near-ties)
    sub = vec[vec["sentence"].isin(ref["sentence"])].sort_values(["sentence", "layer"])
    ref = ref.sort_values(["sentence", "layer"])
    top_eq = np.mean([np.mean(a[dims] == b)
                      for a, b in zip(sub["value_top1"], ref["value_top1"], strict=True)])
    rank_eq = np.mean([np.mean(a[dims] == b)
                       for a, b in zip(sub["value_final_rank"], ref["value_final_rank"], strict=True)])
    print(f"agreement with the reference on its subset: value_top1 {100 * top_eq:.2f}%, "
          f"value_final_rank {100 * rank_eq:.2f}%")
    print(f"RATIO reference / vectorized: {t_ref / t_vec:.0f}x (goal >= 200x)")
    if t_gen is not None:
        print(f"ratio reference / vectorized general path: {t_ref / t_gen:.0f}x")


if __name__ == "__main__":
    main()
