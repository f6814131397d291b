"""Key-value agreement on a randomly initialised fairseq LM of the real WikiText-103 shape: peak memory and
time.

The model is built in memory by fairseq's ``TransformerLanguageModel`` (``transformer_lm_wiki103``: 16 layers,
d=1024, d_ff=4096, adaptive input + adaptive softmax with cutoffs 20000,60000, tied weights) over a synthetic
dictionary of 267,744 entries, wrapped in :class:`~fflayers.backends.fairseq_lm.FairseqLMAdapter`; no
training, no checkpoint. Every key gets ``--targets_per_key`` random trigger targets. Prints peak RSS
(``ru_maxrss``) and wall time, and exits with status 1 when the peak exceeds the goal: the model's own size +
0.6 GB (the original needed ~150 GB). ``--layers`` restricts the run for a quick check.

    python benchmarks/agreement_memory.py [--layers 15] [--targets_per_key 50] [--chunk_values N]
                                          [--threads N]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIKI103_VOCAB = 267_744
GOAL_OVER_MODEL_GB = 0.6


def rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def build_random_fairseq_lm(vocab: int = WIKI103_VOCAB, layers: int = 16, dim: int = 1024, ffn: int = 4096,
                            heads: int = 8, adaptive: bool = True, cutoffs: str = "20000,60000",
                            seed: int = 0):
    """A randomly initialised fairseq ``transformer_lm_wiki103``-style LM (or plain ``transformer_lm`` when
    ``adaptive=False``) over a synthetic dictionary of ``vocab`` symbols, wrapped in a FairseqLMAdapter."""
    import logging

    logging.getLogger("fairseq").setLevel(logging.WARNING)
    from fairseq.data import Dictionary
    from fairseq.models.transformer_lm import (
        TransformerLanguageModel,
        base_lm_architecture,
        transformer_lm_baevski_wiki103,
    )

    from fflayers.backends.fairseq_lm import FairseqLMAdapter

    dictionary = Dictionary()
    for i in range(vocab - dictionary.nspecial):
        dictionary.add_symbol(f"w{i}")
    args = argparse.Namespace(decoder_layers=layers, decoder_embed_dim=dim, decoder_input_dim=dim,
                              decoder_output_dim=dim, decoder_ffn_embed_dim=ffn,
                              decoder_attention_heads=heads,
                              dropout=0.1, max_target_positions=512, tokens_per_sample=512)
    if adaptive:
        args.adaptive_input = True
        args.adaptive_input_cutoff = cutoffs
        args.adaptive_softmax_cutoff = cutoffs
        args.tie_adaptive_weights = True
        transformer_lm_baevski_wiki103(args)
    else:
        args.decoder_normalize_before = True
        base_lm_architecture(args)
    task = types.SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    torch.manual_seed(seed)
    model = TransformerLanguageModel.build_model(args, task)
    return FairseqLMAdapter(model, dictionary, device="cpu")


def synthetic_targets(n_layers: int, d_ff: int, vocab: int, per_key: int, layers: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    return {(layer, i): rng.integers(0, vocab, per_key).tolist() for layer in layers for i in range(d_ff)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="*", type=int, default=None, help="layers to run (default: all 16)")
    p.add_argument("--targets_per_key", type=int, default=50)
    p.add_argument("--chunk_values", type=int, default=None,
                   help="values projected at once (default: library's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fflayers.memories.agreement import key_value_agreement

    t0 = time.perf_counter()
    adapter = build_random_fairseq_lm()
    layers = (list(range(adapter.n_layers)) if not args.layers
              else [adapter.check_layer(x) for x in args.layers])
    n_params = sum(p.numel() for p in adapter.model.parameters())
    model_gb = rss_gb()
    print(f"model: {adapter} ({n_params / 1e6:.1f}M parameters), built in {time.perf_counter() - t0:.1f} s; "
          f"peak RSS so far {rss_gb():.2f} GB")
    targets = synthetic_targets(adapter.n_layers, adapter.d_ff, adapter.vocab_size,
                                args.targets_per_key, layers)
    print(f"targets: {len(targets)} keys x {args.targets_per_key}; peak RSS so far {rss_gb():.2f} GB")
    t1 = time.perf_counter()
    table = key_value_agreement(adapter, targets, layers=layers, chunk_values=args.chunk_values,
                                progress=True)
    wall = time.perf_counter() - t1
    assert len(table) == len(layers) * adapter.d_ff
    per_layer = wall / len(layers)
    print(f"key-value agreement: {len(layers)} layer(s), {len(table)} values, {wall:.1f} s "
          f"({per_layer:.1f} s per layer; all 16 layers ~ {per_layer * adapter.n_layers / 60:.1f} min)")
    peak, goal = rss_gb(), model_gb + GOAL_OVER_MODEL_GB
    print(f"peak RSS: {peak:.2f} GB = model {model_gb:.2f} GB + {peak - model_gb:.2f} GB "
          f"(goal <= model + {GOAL_OVER_MODEL_GB} GB = {goal:.2f} GB; the original held all log-probs: "
          "~150 GB)")
    if peak > goal:
        print(f"FAIL: peak RSS {peak:.2f} GB is above the goal of {goal:.2f} GB", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
