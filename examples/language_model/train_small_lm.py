"""Train a small fairseq transformer LM on a WikiText-style corpus and write a model dir.

Input: a folder holding ``wiki.train.tokens``, ``wiki.valid.tokens`` and ``wiki.test.tokens``
(space-tokenized, one paragraph per line, as in WikiText-103 or ``examples/demo/build_corpus.py``). Output:
``OUT_DIR`` with ``model.pt`` + ``dict.txt`` (loadable by
``fflayers.backends.fairseq_loading.load_fairseq_lm`` and ``fairseq-eval-lm``) and ``OUT_DIR/data-bin`` (the
binarised corpus).

The default model is a miniature of the WikiText-103 LM: adaptive input + adaptive softmax with tied weights,
pre-LN blocks, 4 layers, 128 dim, FFN 512, 4 heads. Training stops after ``--minutes`` of training time or
``--max_update`` updates, whichever comes first. It trains on one CPU thread (``--threads``): about 6k
tokens/s here, so the default budget (3 minutes) covers about 2.5 epochs of a 400k-token corpus.

Usage:
    python examples/language_model/train_small_lm.py --data_dir data/demo-wiki --out_dir runs/small-lm
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from fflayers import fairseq_tools

SPLITS = ("train", "valid", "test")


def train_small_lm(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    layers: int = 4,
    dim: int = 128,
    ffn_dim: int = 512,
    heads: int = 4,
    adaptive: bool = True,
    minutes: float = 3.0,
    max_update: int = 100_000,
    tokens_per_sample: int = 128,
    max_tokens: int = 2048,
    lr: float = 1e-3,
    threshold: int = 3,
    workers: int = 2,
    threads: int = 1,
    seed: int = 1,
    keep_checkpoints: bool = False,
    evaluate: bool = True,
) -> Path:
    """Preprocess ``data_dir`` and train; returns ``out_dir`` (a model dir). Prints progress lines."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    files = {split: data_dir / f"wiki.{split}.tokens" for split in SPLITS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise fairseq_tools.FairseqToolError(
            f"missing {', '.join(missing)}; "
            "--data_dir must hold wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    data_bin = out_dir / "data-bin"
    t0 = time.time()
    fairseq_tools.preprocess(files["train"], files["valid"], files["test"], data_bin, workers=workers,
                             threshold=threshold)
    vocab = fairseq_tools.dict_size(data_bin)
    print(f"preprocessed {data_dir} -> {data_bin} (vocabulary {vocab}) in {time.time() - t0:.0f} s",
          flush=True)
    t0 = time.time()
    fairseq_tools.train_lm(
        data_bin, out_dir, adaptive=adaptive, layers=layers, dim=dim, ffn_dim=ffn_dim, heads=heads,
        max_update=max_update, stop_minutes=minutes, tokens_per_sample=tokens_per_sample,
        max_tokens=max_tokens, lr=lr, warmup_updates=20, seed=seed, normalize_before=True, threads=threads,
    )
    print(f"trained {layers} layers x {dim} dim (FFN {ffn_dim}) in {time.time() - t0:.0f} s", flush=True)
    if not keep_checkpoints:
        for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
            (out_dir / name).unlink(missing_ok=True)
    if evaluate:
        loss = fairseq_tools.eval_lm(
            data_bin, out_dir, subset="test", sample_break_mode="none", tokens_per_sample=tokens_per_sample,
            threads=threads,
        )
        print(f"test loss {loss:.3f} nats/token (perplexity {math.exp(loss):.1f}, "
              f"blocks of {tokens_per_sample} tokens)", flush=True)
    print(f"model dir: {out_dir} (model.pt + dict.txt)", flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="folder with wiki.{train,valid,test}.tokens")
    p.add_argument("--out_dir", required=True, help="model dir to create (model.pt, dict.txt, data-bin/)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--ffn_dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--plain", action="store_true",
                   help="full softmax and plain embeddings instead of adaptive ones")
    p.add_argument("--minutes", type=float, default=3.0, help="training-time budget (default 3)")
    p.add_argument("--max_update", type=int, default=100_000)
    p.add_argument("--tokens_per_sample", type=int, default=128)
    p.add_argument("--max_tokens", type=int, default=2048, help="tokens per update")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threshold", type=int, default=3, help="words seen fewer times in training become <unk>")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for training (default 1)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep_checkpoints", action="store_true", help="keep fairseq's checkpoint_last/best.pt")
    p.add_argument("--no_eval", action="store_true", help="skip fairseq-eval-lm on the test split")
    a = p.parse_args(argv)
    try:
        train_small_lm(
            a.data_dir, a.out_dir, layers=a.layers, dim=a.dim, ffn_dim=a.ffn_dim, heads=a.heads,
            adaptive=not a.plain, minutes=a.minutes, max_update=a.max_update,
            tokens_per_sample=a.tokens_per_sample, max_tokens=a.max_tokens, lr=a.lr, threshold=a.threshold,
            workers=a.workers, threads=a.threads, seed=a.seed, keep_checkpoints=a.keep_checkpoints,
            evaluate=not a.no_eval,
        )
    except fairseq_tools.FairseqToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
