"""Parameters in embedding space: FF keys / values and attention heads projected to the vocabulary.

    fflayers embedding values --hf_model gpt2 --layers 10 11 --neurons 0 1 2 --k 20
    fflayers embedding keys --model_dir checkpoints/adaptive_lm_wiki103.v2 --layers 15 --neurons 7
    fflayers embedding heads --hf_model gpt2 --layers 9 --heads 8 --kind ov --n 50 \\
        --ascii_only --alnum_only --exclude_same --exclude_case_variants --output_file heads.tsv
    fflayers embedding export --hf_model gpt2 --k 20 --output_file values.parquet
    fflayers embedding tsne --hf_model gpt2 --layers 11 --neuron 42 --output_dir maps
    fflayers embedding neurons-vs-hidden --hf_model gpt2 --data_file wiki.valid.tokens \\
        --max_sentences 200 --figure nvh

(``python analysis/embedding_space.py SUBCOMMAND ...`` is the same.) Subcommands: ``keys`` / ``values``
(top-k tokens of chosen neurons), ``heads`` (exact top-N token pairs of each head's W_QK or W_VO, never
building the V x V matrix), ``tsne`` (a 2-D map of a neuron's top tokens: PNG, PDF and a self-contained
interactive HTML), ``neurons-vs-hidden`` (per layer, how many of the hidden state's top tokens its most active
values also rank high, vs random values), ``export`` (every value's, and with ``--sides key value`` every
key's, top-k tokens of all layers as one parquet table, the index LM-Debugger kept in Elasticsearch: query it
with pandas or DuckDB; a run of :mod:`fflayers.runs`: ``--resume`` keeps finished blocks of neurons in
``OUTPUT.ckpt`` and continues an interrupted export from them, and under ``torchrun`` the ranks split the
blocks). Projection matrix: the output embedding (the unembedding; fairseq adaptive softmax:
head rows and tail projections), ``--embedding input`` for the input one; the metadata (``OUTPUT.meta.json``)
says which. Tables print to stdout unless ``--output_file`` is given (:data:`fflayers.io.TABLE_FORMATS`:
.parquet, .tsv, .csv, .jsonl, .pkl; any other suffix is refused before the model loads). Bad input: one line
on stderr, exit code 2, no output file.
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

__all__ = ["PROG", "SUBCOMMANDS", "build_parser", "check_args", "run", "main", "command"]

PROG = "embedding_space.py"
SUBCOMMANDS = ("keys", "values", "heads", "tsne", "neurons-vs-hidden", "export")


def _common(p: argparse.ArgumentParser, output_required: bool = False) -> None:
    add_model_args(p)
    p.add_argument("--embedding", choices=["output", "input"], default="output",
                   help="projection matrix: the output embedding (default) or the input one")
    p.add_argument("--layers", nargs="*", type=int, default=None, help="layers (default: all)")
    p.add_argument("--output_file", type=str, required=output_required, default=None,
                   help="write the table here (.parquet, .tsv, .csv, .jsonl); default: print it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, what in (("keys", "FF keys (read side)"), ("values", "FF values (write side)")):
        s = sub.add_parser(name, help=f"top-k tokens of {what}")
        _common(s)
        s.add_argument("--neurons", nargs="*", type=int, default=None, help="neurons (default: all)")
        s.add_argument("--k", type=int, default=20, help="tokens per neuron")
        s.add_argument("--bottom", action="store_true", help="the most negative scores instead")
    s = sub.add_parser("heads", help="exact top-N token pairs of attention heads (W_QK or W_VO)")
    _common(s)
    s.add_argument("--heads", nargs="*", type=int, default=None, help="heads (default: all)")
    s.add_argument("--kind", choices=["qk", "ov"], nargs="+", default=["ov"], help="W_QK and/or W_VO")
    s.add_argument("--n", type=int, default=50, help="pairs per head")
    s.add_argument("--bottom", action="store_true", help="the N most negative entries instead")
    s.add_argument("--ascii_only", action="store_true", help="only ASCII tokens")
    s.add_argument("--alnum_only", action="store_true", help="only alphanumeric tokens (spaces stripped)")
    s.add_argument("--exclude_same", action="store_true", help="drop pairs of a token with itself")
    s.add_argument("--exclude_case_variants", action="store_true",
                   help="drop pairs whose tokens differ only by case and leading space")
    s.add_argument("--token_list", type=str, default=None,
                   help="only tokens seen in this corpus file (WikiText, text or jsonl)")
    s = sub.add_parser("tsne", help="2-D t-SNE map of a key's or value's top tokens (PNG, PDF, HTML)")
    _common(s)
    s.add_argument("--neuron", type=int, required=True, help="the neuron")
    s.add_argument("--side", choices=["key", "value"], default="value")
    s.add_argument("--k", type=int, default=100, help="tokens on the map")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output_dir", type=str, required=True, help="writes tsne_L{layer}_N{neuron}_{side}.*")
    s = sub.add_parser("neurons-vs-hidden",
                       help="hidden state's top tokens vs its most active values' tokens")
    _common(s)
    s.add_argument("--data_file", type=str, required=True, help="corpus (WikiText .tokens, text or .jsonl)")
    s.add_argument("--max_sentences", type=int, default=200, help="sentences to use (-1: all)")
    s.add_argument("--k", type=int, default=10, help="top tokens compared")
    s.add_argument("--n_neurons", type=int, default=10, help="most active values per layer")
    s.add_argument("--seed", type=int, default=0, help="sentence order, positions and random neurons")
    s.add_argument("--figure", type=str, default=None, help="figure path base (writes .png and .pdf)")
    s = sub.add_parser("export", help="top-k tokens of every value (and key) of all layers, as one table")
    _common(s, output_required=True)
    s.add_argument("--sides", nargs="+", choices=["key", "value"], default=["value"], help="what to export")
    s.add_argument("--k", type=int, default=20, help="tokens per neuron")
    s.add_argument("--resume", action="store_true",
                   help="keep finished blocks of neurons in OUTPUT_FILE.ckpt and continue an interrupted "
                        "export from them")
    return p


def check_args(args: argparse.Namespace) -> None:
    check_model_args(args)
    if args.output_file:
        from fflayers.io import table_suffix

        table_suffix(args.output_file, "--output_file")
    if getattr(args, "k", 1) < 1:
        raise CLIError(f"--k {args.k} must be >= 1")
    if getattr(args, "n", 1) < 1:
        raise CLIError(f"--n {args.n} must be >= 1")
    if getattr(args, "token_list", None) and not Path(args.token_list).is_file():
        raise CLIError(f"--token_list {args.token_list} does not exist; pass a corpus file")
    if getattr(args, "data_file", None) and not Path(args.data_file).is_file():
        raise CLIError(f"--data_file {args.data_file} does not exist; pass a corpus file")
    if getattr(args, "max_sentences", 1) == 0 or getattr(args, "max_sentences", 1) < -1:
        raise CLIError(f"--max_sentences {args.max_sentences} must be positive, or -1 for all")
    if args.command == "tsne" and (args.layers is None or len(args.layers) != 1):
        raise CLIError("tsne needs exactly one layer: --layers L")


def _layers(adapter, args) -> list[int]:
    return adapter.check_layers(args.layers or None)


def _pair_filter(adapter, args):
    from fflayers.embedding_space import PairFilter, case_space_groups, token_mask
    from fflayers.embedding_space.vocabulary import read_token_list

    tokens = adapter.vocab.tokens
    mask = token_mask(tokens, ascii_only=args.ascii_only, alnum_only=args.alnum_only)
    if args.token_list:
        listed = read_token_list(adapter, args.token_list)
        mask = listed if mask is None else mask & listed
    if mask is not None and not bool(mask.any()):
        raise CLIError("no token of the vocabulary passes the filters; "
                       "relax --ascii_only/--alnum_only/--token_list")
    groups = case_space_groups(tokens) if args.exclude_case_variants else None
    return PairFilter(rows=mask, cols=mask, exclude_same=args.exclude_same, groups=groups)


def run_heads(adapter, E, args):
    import pandas as pd
    from tqdm.auto import tqdm

    from fflayers.embedding_space import head_pairs

    layers = _layers(adapter, args)
    n_heads = adapter.attention_weights(layers[0]).n_heads
    heads = list(range(n_heads)) if not args.heads else args.heads
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise CLIError(f"--heads {bad[0]} is out of range: the model has {n_heads} heads (0..{n_heads - 1})")
    V = E.matrix.shape[0]
    if args.n > V * V:
        raise CLIError(f"--n {args.n} is larger than the {V} x {V} = {V * V} token pairs; pass a smaller N")
    filt = _pair_filter(adapter, args)
    jobs = [(layer, head, kind) for layer in layers for head in heads for kind in args.kind]
    frames = [head_pairs(adapter, E, layer, head, kind, n=args.n, largest=not args.bottom, filt=filt)
              for layer, head, kind in tqdm(jobs, desc="heads", unit="head", disable=args.quiet)]
    return pd.concat(frames, ignore_index=True)


def run_neurons(adapter, E, args):
    from fflayers.embedding_space import neuron_tokens

    side = "key" if args.command == "keys" else "value"
    return neuron_tokens(adapter, E, _layers(adapter, args), sides=[side], k=args.k, neurons=args.neurons,
                         largest=not args.bottom)


def run_tsne(adapter, E, args) -> list[Path]:
    from fflayers.embedding_space.maps import token_map, write_token_map_html
    from fflayers.embedding_space.projections import neuron_vectors
    from fflayers.io import check_folder_writable, write_table
    from fflayers.plots import plot_token_map, save_figure

    out = Path(args.output_dir)
    if not out.is_dir():
        raise CLIError(f"--output_dir {out} does not exist; create it first")
    check_folder_writable(out)
    layer = adapter.check_layer(args.layers[0])
    if not 0 <= args.neuron < adapter.d_ff:
        raise CLIError(f"--neuron {args.neuron} is out of range: layers have {adapter.d_ff} neurons "
                       f"(0..{adapter.d_ff - 1})")
    vector = neuron_vectors(adapter, layer, args.side)[args.neuron]
    table = token_map(E, adapter.vocab.tokens, vector, k=args.k, seed=args.seed)
    base = out / f"tsne_L{layer}_N{args.neuron}_{args.side}"
    title = f"Top {args.k} tokens of {args.side} {args.neuron}, layer {layer} (t-SNE of their embeddings)"
    paths = save_figure(plot_token_map(table, title), base)
    write_token_map_html(table, f"{base}.html", title)
    write_table(f"{base}.tsv", table)
    return [*paths, Path(f"{base}.html"), Path(f"{base}.tsv")]


def run_neurons_vs_hidden(adapter, E, args):
    from fflayers.data import model_sentences
    from fflayers.embedding_space.neurons_vs_hidden import neurons_vs_hidden, overlap_by_layer

    sentences = model_sentences(adapter, args.data_file, args.seed, args.max_sentences)
    ids = [seq for seq in (adapter.vocab.tokenize(x) for x in sentences) if seq]
    if not ids:
        raise CLIError("the corpus yields no tokens; pass a non-empty corpus")
    table = neurons_vs_hidden(adapter, E, ids, layers=_layers(adapter, args), k=args.k,
                              n_neurons=args.n_neurons, seed=args.seed, progress=not args.quiet)
    summary = overlap_by_layer(table)
    if args.figure:
        from fflayers.plots import plot_neurons_vs_hidden, save_figure

        save_figure(plot_neurons_vs_hidden(summary), args.figure)
    return summary


def run_export(adapter, E, args, output: Path) -> int | None:
    """Write the table to ``output`` (parquet: streamed), a run of :mod:`fflayers.runs` (see
    :mod:`fflayers.embedding_space.export`); returns the row count on rank 0, None on the other ranks."""
    from fflayers.distributed import dist_info
    from fflayers.embedding_space.export import ExportConfig, export_table

    config = ExportConfig(_layers(adapter, args), list(args.sides), args.k, args.embedding)
    rows, run = export_table(adapter, E, output, config, resume=args.resume, progress=not args.quiet)
    if not dist_info().is_main:
        return None
    print(f"{prog_name()}: export: {run.plan['n_shards']} shards of {run.plan['n_units']} blocks of neurons; "
          f"computed {run.computed_all}, reused {run.reused} finished shard(s)")
    return rows


def run(args: argparse.Namespace) -> None:
    from fflayers.distributed import dist_info, finish, join_ranks

    check_args(args)
    info = dist_info()
    if info.enabled and args.command == "export":
        args.device = str(join_ranks(info, args.device, timeout_s=7 * 24 * 3600))
    elif not info.is_main:
        return  # under torchrun, ranks split the export; everything else runs on rank 0
    try:
        run_subcommand(args)
    finally:
        finish()


def run_subcommand(args: argparse.Namespace) -> None:
    """One subcommand (on every rank for the export; the others on rank 0)."""
    from fflayers.embedding_space import embedding_matrix
    from fflayers.io import check_writable, run_metadata, write_json, write_table

    start = time.time()
    output = check_writable(args.output_file) if args.output_file else None
    adapter = load_adapter(args)
    E = embedding_matrix(adapter, args.embedding)
    if args.command == "tsne":
        paths = run_tsne(adapter, E, args)
        print(f"{prog_name()}: wrote {', '.join(map(str, paths))}")
        return
    if args.command == "export":
        n_rows = run_export(adapter, E, args, output)
        if n_rows is None:
            return
    else:
        if args.command == "heads":
            table = run_heads(adapter, E, args)
        elif args.command == "neurons-vs-hidden":
            table = run_neurons_vs_hidden(adapter, E, args)
        else:
            table = run_neurons(adapter, E, args)
        n_rows = len(table)
        if output is None:
            import pandas as pd

            with pd.option_context("display.max_rows", 200, "display.width", 160):
                print(table.to_string(index=False))
        else:
            write_table(output, table)
    if output is not None:
        config = dict(vars(args))
        config.update(model=repr(adapter), embedding_kind=E.kind, rows=n_rows,
                      seconds=round(time.time() - start, 3))
        write_json(str(output) + ".meta.json", run_metadata(config))
        print(f"{prog_name()}: wrote {n_rows} rows to {output} (projected with the {E.kind}) in "
              f"{time.time() - start:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``embedding_space.py``; returns the exit code (2 for bad input, one line on stderr)."""
    return run_main(PROG, build_parser, run, argv)


def command(argv: Sequence[str] | None, prog: str, epilog: str | None = None) -> int:
    """``fflayers embedding``: the same, named ``prog``."""
    return run_command(prog, build_parser, run, argv, epilog, subcommands=SUBCOMMANDS)
