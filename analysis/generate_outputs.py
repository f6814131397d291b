"""Trigger examples of FFN keys (``--get_trigger_examples``) or layer / value predictions
(``--extract_ffn_info``) over a corpus; the flags of the original ``analysis/generate_outputs.py``.

    python analysis/generate_outputs.py --data_file wiki.train.tokens --model_dir checkpoints/adaptive_lm_wiki103.v2 \
        --get_trigger_examples --max_sentences 1000000 --top_k_trigger_examples 50 --extract_mode layer-raw \
        --output_file top50_train_1000000sents.jsonl

Pipeline: read the corpus (WikiText token lines for ``*.tokens``, else plain text / JSON lines), shuffle lines
with ``--seed`` (default 0xdead = 57005, the original's), split them into sentences, keep the first
``--max_sentences``, tokenize with the model, then mine (:func:`fflayers.memories.trigger_examples`) or
extract (:func:`fflayers.memories.ffn_info.extract_ffn_info`).

Outputs: trigger examples as the original JSONL (one line per dim) or, for ``.parquet``/``.pkl``/``.tsv``/
``.csv``, a long table (layer, dim, rank, sentence_id, position, value, text); FFN info as a pickled
DataFrame (``.pkl``, the original) or parquet/tsv/csv by extension. The run's config and metadata go to
``OUTPUT_FILE.meta.json``. Bad input: one line on stderr, exit code 2, no output file.

New flags: ``--hf_model`` (a HuggingFace id or folder, instead of ``--model_dir``), ``--gguf_file``,
``--device``, ``--batch_tokens``, ``--layers``, ``--seed``, ``--resume`` (checkpoint in
``OUTPUT_FILE.ckpt``, removed after a successful run), ``--raw_wikitext`` (a subword model reads a ``.tokens``
corpus as it is; by default it reads it detokenized, as ordinary text), ``--trust-checkpoint`` (full unpickling of old
fairseq checkpoints you trust), ``--quiet`` (no progress bars). ``--multiprocess`` is accepted and ignored. ``--model_dir`` has no default
(the original's was ``checkpoints/adaptive_lm_wiki103.v2``): give it or ``--hf_model``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from fflayers.cli import CLIError, Parser, add_model_args, check_model_args, load_adapter, run_main

PROG = "generate_outputs.py"
DEFAULT_SEED = 0xDEAD
TABLE_SUFFIXES = (".parquet", ".pkl", ".pickle", ".tsv", ".csv")
UNK_LIMIT = 0.5


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--data_file", type=str, help="corpus: WikiText-format .tokens, plain text or .jsonl")
    add_model_args(p)
    p.add_argument("--output_file", type=str, default="",
                   help=".jsonl for trigger examples, .pkl for ffn info (.parquet/.tsv/.csv: tables)")
    p.add_argument("--max_sentences", type=int, default=-1, help="number of sentences to use, -1 for all")
    p.add_argument("--multiprocess", type=int, default=20, help="ignored (kept for compatibility)")
    p.add_argument("--get_trigger_examples", action="store_true", help="get trigger examples for keys in the network")
    p.add_argument("--top_k_trigger_examples", type=int, default=50, help="trigger examples per key")
    p.add_argument("--dims_for_analysis", nargs="*", type=int, default=None, help="FFN dims to analyse (default: all)")
    p.add_argument("--extract_ffn_info", action="store_true", help="extract layer / value predictions")
    p.add_argument("--extract_mode", choices=["dim", "layer", "layer-raw"], default="layer-raw")
    p.add_argument("--layers", nargs="*", type=int, default=None, help="layers to analyse (default: all)")
    p.add_argument("--batch_tokens", type=int, default=4096, help="padded tokens per batch")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="line shuffling seed (default 0xdead, the original's)")
    p.add_argument("--resume", action="store_true", help="checkpoint to OUTPUT_FILE.ckpt and continue from it")
    p.add_argument("--raw_wikitext", action="store_true",
                   help="feed a .tokens corpus to a subword (HF) model as it is (default: detokenized to ordinary "
                        "text: '@-@' -> '-', no space before punctuation, \"John 's\" -> \"John's\")")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations before anything is loaded."""
    if args.get_trigger_examples == args.extract_ffn_info:
        raise CLIError("pass exactly one of --get_trigger_examples and --extract_ffn_info")
    if args.get_trigger_examples and args.extract_mode != "layer-raw":
        raise CLIError("--get_trigger_examples needs --extract_mode layer-raw")
    if args.extract_ffn_info and args.extract_mode == "layer-raw":
        raise CLIError("--extract_ffn_info needs --extract_mode layer or dim")
    check_model_args(args)
    if not args.data_file:
        raise CLIError("--data_file is required")
    if not args.output_file:
        raise CLIError("--output_file is required")
    if args.top_k_trigger_examples < 1:
        raise CLIError(f"--top_k_trigger_examples {args.top_k_trigger_examples} must be >= 1")
    if args.max_sentences == 0 or args.max_sentences < -1:
        raise CLIError(f"--max_sentences {args.max_sentences} must be positive, or -1 for all")
    if args.batch_tokens < 1:
        raise CLIError(f"--batch_tokens {args.batch_tokens} must be >= 1")
    if args.resume and not args.get_trigger_examples:
        raise CLIError("--resume applies to --get_trigger_examples only")
    if args.dims_for_analysis is not None and any(d < 0 for d in args.dims_for_analysis):
        raise CLIError(f"--dims_for_analysis {min(args.dims_for_analysis)} is negative; dims count from 0")
    if not Path(args.data_file).is_file():
        raise CLIError(f"--data_file {args.data_file} does not exist; pass a corpus file")


def check_parquet() -> None:
    """Fail before the run, not after it, when parquet cannot be written."""
    try:
        import pyarrow  # noqa: F401
    except ImportError as err:
        raise CLIError(f"parquet output needs a working pyarrow ({str(err).splitlines()[0]}); "
                       "install one that matches numpy, or write .pkl / .jsonl") from None


def check_vocabulary(adapter, ids: list[list[int]]) -> None:
    """Fail when most corpus tokens are unknown to the model (corpus and dictionary do not match)."""
    from fflayers.memories.agreement import unk_id

    unk = unk_id(adapter)
    if unk is None:
        return
    bos = adapter.bos_id
    n_unk = n_all = 0
    for seq in ids:
        body = seq[1:] if seq and bos is not None and seq[0] == bos else seq
        n_all += len(body)
        n_unk += sum(1 for t in body if t == unk)
    if n_all and n_unk / n_all > UNK_LIMIT:
        raise CLIError(
            f"{100 * n_unk / n_all:.0f}% of the corpus tokens are unknown (<unk>) to the model's dictionary; "
            "the corpus does not match the model: use text tokenized like its training data"
        )


def read_sentences(args: argparse.Namespace, pretokenized: bool) -> list[str]:
    """Shuffled sentences of the corpus (first ``--max_sentences``)."""
    from fflayers.data import read_corpus, read_wikitext_lines, shuffled_sentences

    path = args.data_file
    lines = read_wikitext_lines(path) if pretokenized else read_corpus(path)
    return shuffled_sentences(lines, seed=args.seed, max_sentences=args.max_sentences, pretokenized=pretokenized)


def tokenize(adapter, sentences: list[str]) -> tuple[list[str], list[list[int]]]:
    """Texts for the output (word-level models: the space-joined words) and token ids of each sentence."""
    words = getattr(adapter, "words", None)
    texts: list[str] = []
    ids: list[list[int]] = []
    for sent in sentences:
        seq = adapter.tokenize(sent)
        if not seq:
            continue
        texts.append(" ".join(words(sent)) if callable(words) else sent)
        ids.append(seq)
    if not ids:
        raise CLIError("the corpus yields no tokens; pass a non-empty corpus")
    check_vocabulary(adapter, ids)
    return texts, ids


def run(args: argparse.Namespace) -> None:
    from fflayers.data import text_for_model
    from fflayers.io import check_writable, run_metadata, write_json, write_jsonl, write_table

    check_args(args)
    output = check_writable(args.output_file)
    if output.suffix.lower() == ".parquet":
        check_parquet()
    pretokenized = Path(args.data_file).suffix.lower() == ".tokens"
    start = time.time()
    sentences = read_sentences(args, pretokenized)
    adapter = load_adapter(args, raw_text=not pretokenized)
    if args.dims_for_analysis:
        bad = [d for d in args.dims_for_analysis if d >= adapter.d_ff]
        if bad:
            raise CLIError(f"--dims_for_analysis {bad[0]} is out of range: the model has {adapter.d_ff} FFN dims (0..{adapter.d_ff - 1})")
    dims = args.dims_for_analysis or None
    layers = None if args.layers is None or not args.layers else [adapter.check_layer(x) for x in args.layers]
    texts, ids = tokenize(adapter, text_for_model(adapter, sentences, pretokenized, args.raw_wikitext))
    print(f"{PROG}: {len(ids)} sentences, {sum(map(len, ids))} tokens, model {adapter}")

    if args.get_trigger_examples:
        from fflayers.memories.trigger_examples import trigger_examples

        ckpt = Path(str(output) + ".ckpt") if args.resume else None
        result = trigger_examples(adapter, ids, k=args.top_k_trigger_examples, layers=layers, dims=dims,
                                  batch_tokens=args.batch_tokens, progress=not args.quiet, checkpoint_dir=ckpt)
        if output.suffix.lower() in TABLE_SUFFIXES:
            table = result.to_frame()
            table["text"] = [texts[i] for i in table["sentence_id"]]
            write_table(output, table)
        else:
            write_jsonl(output, result.to_jsonl_rows(texts))
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)
    else:
        from fflayers.memories.ffn_info import extract_ffn_info

        table = extract_ffn_info(adapter, ids, mode=args.extract_mode, layers=layers, dims=dims, seed=args.seed,
                                 batch_tokens=args.batch_tokens, progress=not args.quiet)
        write_table(output, table)

    config = dict(vars(args))
    config.update(n_sentences=len(ids), n_tokens=sum(map(len, ids)), device=str(adapter.device),
                  model=repr(adapter), seconds=round(time.time() - start, 3))
    write_json(str(output) + ".meta.json", run_metadata(config, inputs={"data_file": args.data_file}))
    print(f"{PROG}: wrote {output} in {time.time() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, with one line on stderr)."""
    return run_main(PROG, build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
