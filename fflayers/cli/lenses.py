"""Lenses compared: train a tuned (or hybrid) lens, evaluate lenses on the same tokens, plot the table.

    fflayers lenses train --hf_model M --data_file wiki.train.tokens --output_dir lens_tuned --steps 250
    fflayers lenses train --hf_model M --data_file wiki.train.tokens --kind hybrid \\
        --shortcuts shortcuts/maps.safetensors --output_dir lens_hybrid
    fflayers lenses eval --hf_model M --data_file wiki.valid.tokens --lens lens_tuned --max_sentences 100 \\
        --output tuned.parquet
    fflayers lenses compare --hf_model M --data_file wiki.valid.tokens --tuned lens_tuned \\
        --hybrid lens_hybrid --shortcuts shortcuts/maps.safetensors --max_sentences 100 \\
        --output lenses.parquet --figure lenses
    fflayers lenses plot --input lenses.parquet --output lenses

``train`` reads the first ``--max_sentences`` sentences of ``--data_file`` after a ``--seed`` shuffle, and
saves the lens in the tuned-lens layout (``config.json`` + ``params.pt``, with ``fflayers_lens.json``);
``--resume`` continues from ``OUTPUT_DIR/train.ckpt``; under torchrun the ranks split each step and sum
their gradients. ``eval`` and ``compare`` read the first ``--max_sentences`` sentences of ``--data_file`` in
file order (nothing shuffled, nothing held out), every position with a next token (``--positions all``) or
one per sentence (``random``), so anyone can recompute the numbers; rows carry ``lens, layer, n_tokens`` and
every metric of :mod:`fflayers.lenses.metrics`. Tables by suffix (.parquet, .csv, .jsonl, ...) with
``OUTPUT.meta.json``. Bad input: one line on stderr, exit code 2, no output file.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from fflayers.cli.common import (
    CLIError,
    Parser,
    add_model_args,
    check_model_args,
    load_adapter,
    prog_name,
    run_command,
    run_main,
)

__all__ = ["PROG", "SUBCOMMANDS", "build_parser", "command", "corpus_sequences", "main", "run"]

PROG = "fflayers lenses"
SUBCOMMANDS = ("train", "eval", "compare", "plot")


def _data(p: argparse.ArgumentParser, default_sentences: int) -> None:
    add_model_args(p)
    p.add_argument("--data_file", type=str, required=True, help="corpus (WikiText .tokens, text or .jsonl)")
    p.add_argument("--max_sentences", type=int, default=default_sentences, help="sentences read")
    p.add_argument("--raw_wikitext", action="store_true",
                   help="feed WikiText token text as it is to subword models (default: detokenized)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast of the model's forward (lenses stay float32; fp16 needs a GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    s = sub.add_parser("train", help="train a tuned lens (or the hybrid: translators start at the mat maps)")
    _data(s, 1000)
    s.add_argument("--output_dir", type=str, required=True, help="lens folder (tuned-lens layout)")
    s.add_argument("--kind", choices=["tuned", "hybrid"], default="tuned")
    s.add_argument("--shortcuts", type=str, default=None, help="maps.safetensors of `fflayers shortcuts fit`")
    s.add_argument("--steps", type=int, default=250)
    s.add_argument("--tokens_per_step", type=int, default=2**18)
    s.add_argument("--batch_tokens", type=int, default=4096, help="tokens of one micro-batch (memory only)")
    s.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 1.0 for tuned, the paper's; 0.1 for hybrid, which starts "
                        "near its optimum)")
    s.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    s.add_argument("--weight_decay", type=float, default=1e-3)
    s.add_argument("--layers", type=int, nargs="*", default=None, help="translators trained (default: all)")
    s.add_argument("--seed", type=int, default=0, help="corpus shuffle")
    s.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/train.ckpt")
    for name, many in (("eval", False), ("compare", True)):
        s = sub.add_parser(name, help="the lenses side by side on the same tokens" if many
                           else "one lens per layer on the given tokens")
        _data(s, 100)
        if many:
            s.add_argument("--tuned", type=str, default=None, help="a tuned lens folder")
            s.add_argument("--hybrid", type=str, default=None, help="a hybrid lens folder")
            s.add_argument("--patchscope_layers", type=int, nargs="*", default=None,
                           help="layers read by the Patchscope (default: all; a forward per state)")
            s.add_argument("--no_patchscope", action="store_true", help="leave the Patchscope out")
            s.add_argument("--figure", type=str, default=None, help="also write FIGURE.png / .pdf")
        else:
            s.add_argument("--lens", type=str, required=True,
                           help="a lens folder (tuned-lens layout), or 'logit', or 'mat' (with --shortcuts)")
        s.add_argument("--shortcuts", type=str, default=None, help="maps.safetensors: adds the mat lens")
        s.add_argument("--positions", choices=["all", "random"], default="all")
        s.add_argument("--layers", type=int, nargs="*", default=None, help="states 0..L (default: all)")
        s.add_argument("--seed", type=int, default=0, help="the random position of each sentence")
        s.add_argument("--batch_size", type=int, default=8, help="sentences per forward")
        s.add_argument("--output", type=str, required=True, help="table (.parquet, .csv, .jsonl, ...)")
    s = sub.add_parser("plot", help="figure of an eval / compare table: a panel per metric, a line per lens")
    s.add_argument("--input", type=str, required=True)
    s.add_argument("--output", type=str, required=True, help="figure path without suffix (.png and .pdf)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Everything checkable before the model loads."""
    from fflayers.io import table_suffix

    if args.command == "plot":
        if not Path(args.input).is_file():
            raise CLIError(f"--input {args.input} does not exist; run fflayers lenses compare first")
        return
    check_model_args(args)
    if not Path(args.data_file).is_file():
        raise CLIError(f"--data_file {args.data_file} does not exist; pass a corpus file")
    if args.dtype == "fp16" and args.device == "cpu":
        raise CLIError("--dtype fp16 needs a GPU; use --dtype bf16 on the CPU")
    if args.max_sentences < 1:
        raise CLIError(f"--max_sentences {args.max_sentences} must be >= 1")
    for name in ("shortcuts", "tuned", "hybrid"):
        path = getattr(args, name, None)
        if path is not None and not Path(path).exists():
            raise CLIError(f"--{name} {path} does not exist")
    if args.command == "train":
        if args.kind == "hybrid" and not args.shortcuts:
            raise CLIError("--kind hybrid starts at the shortcut maps: pass --shortcuts maps.safetensors")
        for name in ("steps", "tokens_per_step", "batch_tokens"):
            if getattr(args, name) < 1:
                raise CLIError(f"--{name} {getattr(args, name)} must be >= 1")
        if args.lr is None:
            args.lr = 1.0 if args.kind == "tuned" else 0.1
        if not args.lr > 0:
            raise CLIError(f"--lr {args.lr} must be positive")
    else:
        table_suffix(args.output, "--output")
        if args.command == "eval" and args.lens == "mat" and not args.shortcuts:
            raise CLIError("--lens mat needs --shortcuts maps.safetensors")


def corpus_sequences(adapter, data_file: str, max_sentences: int, raw_wikitext: bool = False,
                     seed: int | None = None) -> list[list[int]]:
    """Token ids of the first ``max_sentences`` sentences of ``data_file`` (file order, or shuffled with
    ``seed``), cut to the model's length; sentences of one token are dropped."""
    from fflayers.data import model_sentences, read_corpus
    from fflayers.data.sentences import iter_sentences
    from fflayers.data.wikitext import text_for_model

    if seed is None:
        pretokenized = Path(data_file).suffix.lower() == ".tokens"
        texts = []
        for sentence in iter_sentences(read_corpus(data_file), pretokenized):
            texts.append(sentence)
            if len(texts) >= max_sentences:
                break
        texts = text_for_model(adapter, texts, pretokenized, raw_wikitext)
    else:
        texts = model_sentences(adapter, data_file, seed, max_sentences, raw_wikitext)
    limit = adapter.max_positions or 10**9
    ids = [seq[:limit] for seq in (adapter.vocab.tokenize(t) for t in texts) if len(seq) > 1]
    if not ids:
        raise CLIError(f"--data_file {data_file} gives no sentence of two tokens or more")
    return ids


def _maps(adapter, path: str | None):
    from fflayers.shortcuts import load_maps

    return None if path is None else load_maps(path, adapter)[0]


def run_train(args: argparse.Namespace) -> None:
    from fflayers.distributed import dist_info, finish, join_ranks
    from fflayers.lenses import LensTrainConfig, TunedLens, train_lens
    from fflayers.runs import file_digest

    info = dist_info()
    if info.enabled:
        args.device = str(join_ranks(info, args.device, timeout_s=7 * 24 * 3600))
    try:
        adapter = load_adapter(args)
        config = LensTrainConfig(kind=args.kind, steps=args.steps, tokens_per_step=args.tokens_per_step,
                                 lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
                                 batch_tokens=args.batch_tokens, dtype=args.dtype,
                                 layers=None if args.layers is None else tuple(args.layers))
        sequences = corpus_sequences(adapter, args.data_file, args.max_sentences, args.raw_wikitext,
                                     args.seed)
        lens = TunedLens.from_shortcuts(adapter, _maps(adapter, args.shortcuts)) if args.kind == "hybrid" \
            else TunedLens(adapter)
        out = Path(args.output_dir)
        ckpt = out / "train.ckpt" if args.resume else None
        start = time.time()
        lens, losses = train_lens(adapter, sequences, config, lens=lens, checkpoint=ckpt,
                                  progress=not args.quiet)
        if info.is_main:
            lens.save(out, extra={"train": {**vars(config), "layers": args.layers,
                                            "data_file": file_digest(args.data_file),
                                            "max_sentences": args.max_sentences, "seed": args.seed},
                                  "losses": losses})
            if ckpt is not None:
                ckpt.unlink(missing_ok=True)
            print(f"{prog_name()}: {args.kind} lens, {config.steps} steps, loss {losses[0]:.4f} -> "
                  f"{losses[-1]:.4f} nats (sum over layers of the mean KL) -> {out} in "
                  f"{time.time() - start:.1f} s")
    finally:
        finish()


def lenses_of(adapter, args: argparse.Namespace) -> dict:
    """Name -> lens for ``eval`` (the one ``--lens``) or ``compare`` (every lens that was given)."""
    from fflayers.lenses import LinearShortcutLens, LogitLens, TokenIdentityPatchscope, load_lens

    if args.command == "eval":
        if args.lens == "logit":
            return {"logit": LogitLens(adapter)}
        if args.lens == "mat":
            return {"mat": LinearShortcutLens(adapter, _maps(adapter, args.shortcuts))}
        lens = load_lens(args.lens, adapter)
        return {lens.name: lens}
    out: dict = {"logit": LogitLens(adapter)}
    if args.shortcuts:
        out["mat"] = LinearShortcutLens(adapter, _maps(adapter, args.shortcuts))
    for name in ("tuned", "hybrid"):
        if getattr(args, name):
            out[name] = load_lens(getattr(args, name), adapter)
    if not args.no_patchscope:
        out["patchscope"] = TokenIdentityPatchscope(adapter)
    return out


def run_eval(args: argparse.Namespace) -> None:
    import pandas as pd

    from fflayers.io import run_metadata, write_json, write_table
    from fflayers.lenses import evaluate_lenses

    start = time.time()
    adapter = load_adapter(args)
    sequences = corpus_sequences(adapter, args.data_file, args.max_sentences, args.raw_wikitext)
    lenses = lenses_of(adapter, args)
    groups = [(lenses, args.layers)]
    scope_layers = getattr(args, "patchscope_layers", None)
    if "patchscope" in lenses and scope_layers is not None:  # the Patchscope runs a forward per state
        scope = {"patchscope": lenses.pop("patchscope")}
        groups = [(lenses, args.layers), (scope, scope_layers)]
    table = pd.concat([evaluate_lenses(adapter, group, sequences, layers, args.positions, args.seed,
                                       args.batch_size, not args.quiet, args.dtype)
                       for group, layers in groups], ignore_index=True)
    write_table(args.output, table)
    inputs = {"data_file": args.data_file} | ({"shortcuts": args.shortcuts} if args.shortcuts else {})
    write_json(str(args.output) + ".meta.json", run_metadata({**vars(args), "model": repr(adapter)}, inputs))
    print(f"{prog_name()}: {len(table)} rows ({', '.join(table['lens'].unique())}; "
          f"{int(table['n_tokens'].iloc[0])} tokens) -> {args.output} in {time.time() - start:.1f} s")
    if getattr(args, "figure", None):
        _figure(table, args.figure)


def _figure(table, output: str) -> None:
    from fflayers.plots import plot_lens_comparison, save_figure

    paths = save_figure(plot_lens_comparison(table), output)
    print(f"{prog_name()}: figure -> {', '.join(map(str, paths))}")


def run(args: argparse.Namespace) -> None:
    check_args(args)
    if args.command == "train":
        run_train(args)
    elif args.command == "plot":
        from fflayers.cli.tables import read_table

        _figure(read_table(args.input), args.output)
    else:
        run_eval(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fflayers.cli.lenses``; returns the exit code (2 for bad input, one line on stderr)."""
    return run_main(PROG, build_parser, run, argv)


def command(argv: Sequence[str] | None, prog: str, epilog: str | None = None) -> int:
    """``fflayers lenses``: the same, named ``prog``."""
    return run_command(prog, build_parser, run, argv, epilog, subcommands=SUBCOMMANDS)
