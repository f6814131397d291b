"""Dissecting factual recall (Geva et al., 2023): fact sets, attention knockout and the other analyses.

    fflayers recall facts --hf_model gpt2-xl --facts known_1000.json --filter --output known.json
    fflayers recall facts --hf_model DIR --gguf_file F.gguf --countries --filter --output caps.json
    fflayers recall knockout --hf_model gpt2-xl --facts known.json --output knockout.parquet
    fflayers recall project --hf_model gpt2-xl --facts known.json --positions subject_last last \\
        --no_final_norm --output projections.parquet
    fflayers recall extraction --hf_model gpt2-xl --facts known.json \\
        --variants none block_subject block_non_subject block_last patch_subject --output extraction.parquet
    fflayers recall enrichment --hf_model gpt2-xl --facts known.json --paragraphs wiki.txt \\
        --output enrichment.parquet
    fflayers recall sublayer-knockout --hf_model gpt2-xl --facts known.json --paragraphs wiki.txt \\
        --window 10 --output sublayer_knockout.parquet
    fflayers recall plot --kind knockout --input knockout.parquet --output knockout

(``python analysis/dissect_recall.py SUBCOMMAND ...`` is the same.) Every model subcommand reads facts from
``--facts`` (ROME's known_1000 JSON) or ``--countries`` (the Debian country -> capital list, prompt "The
capital of {} is"); ``--filter`` keeps the facts whose top-1 next token is the attribute's first token. A fact
that cannot be used (subject not in its prompt, a missing field, a prompt longer than the model) is reported
on one line and skipped; the run goes on with the others. Tables are written in the format of ``--output``'s
extension (:data:`fflayers.io.TABLE_FORMATS`: .parquet, .tsv, .csv, .jsonl, .pkl) with ``OUTPUT.meta.json``
beside them. The table subcommands run on :mod:`fflayers.runs` (see :mod:`fflayers.cli.tables`): ``--resume``
keeps finished blocks of facts in ``OUTPUT.ckpt`` and continues an interrupted run from them (the folder is
removed once the output is written; a folder of other options, inputs or another analysis is refused), and
under ``torchrun`` each rank computes its share of the blocks and rank 0 writes the output. ``plot`` draws a
table's figure as PNG and PDF. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from fflayers.cli.common import (
    CLIError,
    Parser,
    check_model_args,
    check_range,
    prog_name,
    run_command,
    run_main,
)
from fflayers.cli.recall_analyses import ANALYSES, PLOT_KINDS
from fflayers.cli.recall_base import Subcommand, add_shared_args
from fflayers.cli.tables import read_table

__all__ = ["PROG", "SUBCOMMANDS", "build_parser", "check_args", "run", "main", "command"]

PROG = "dissect_recall.py"


def _plot_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--kind", required=True, help="which figure: " + ", ".join(PLOT_KINDS))
    s.add_argument("--input", required=True, help="the analysis' table")
    s.add_argument("--output", required=True, help="figure path without extension (writes .png and .pdf)")
    s.add_argument("--title", default=None, help="figure title (default: the paper's)")


def run_plot(args: argparse.Namespace) -> None:
    from fflayers.plots import save_figure

    if args.kind not in PLOT_KINDS:
        raise CLIError(f"--kind {args.kind!r} is unknown; choose from {', '.join(PLOT_KINDS)}")
    table = read_table(args.input)
    try:
        figure = PLOT_KINDS[args.kind](table, args)
    except KeyError as err:
        raise CLIError(f"{args.input} is not a {args.kind} table (it has no column {err}; it has "
                       f"{', '.join(map(str, table.columns[:8]))}); make one with "
                       f"`fflayers recall {args.kind} ...` (dissect_recall.py {args.kind})") from None
    written = save_figure(figure, args.output)
    print(f"{prog_name()}: wrote {', '.join(str(p) for p in written)}")


#: name -> subcommand, in the order of ``--help``
SUBCOMMANDS: dict[str, Subcommand] = {c.name: c for c in (
    *ANALYSES,
    Subcommand("plot", "draw a result table's figure (PNG and PDF)", _plot_args, run_plot, needs_model=False),
)}


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in SUBCOMMANDS.values():
        s = sub.add_parser(command.name, help=command.help)
        if command.needs_model:
            add_shared_args(s)
        command.add_args(s)
    return p


def check_args(args: argparse.Namespace) -> None:
    if not SUBCOMMANDS[args.command].needs_model:
        return
    check_model_args(args)
    if args.batch_size < 1:
        raise CLIError(f"--batch_size {args.batch_size} must be >= 1")
    if args.max_facts is not None and args.max_facts < 1:
        raise CLIError(f"--max_facts {args.max_facts} must be >= 1")
    for name in ("k", "top", "keep"):  # the subcommands that have them
        check_range(args, name, 1)
    check_range(args, "window", 0 if args.command == "sublayer-knockout" else 1)
    check_range(args, "patch_layer", 0)
    if args.facts is not None and not Path(args.facts).is_file():
        raise CLIError(f"--facts {args.facts} does not exist; pass a known_1000 JSON file")
    if args.countries_file is not None and not args.countries:
        raise CLIError("--countries_file goes with --countries")
    from fflayers.io import check_writable

    check_writable(args.output)


def run(args: argparse.Namespace) -> None:
    """Run the subcommand; under ``torchrun`` each rank computes its share of the facts' shards (rank 0
    writes the output)."""
    from fflayers.distributed import dist_info, finish, join_ranks

    check_args(args)
    start = time.time()
    command = SUBCOMMANDS[args.command]
    info = dist_info()
    if command.needs_model and info.enabled:
        args.device = str(join_ranks(info, args.device, timeout_s=7 * 24 * 3600))
    try:
        command.run(args)
    finally:
        if command.needs_model and info.enabled:
            finish()
    if command.needs_model and info.is_main:
        print(f"{prog_name()}: {args.command} done in {time.time() - start:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dissect_recall.py``; returns the exit code (2 for bad input, one line on stderr)."""
    return run_main(PROG, build_parser, run, argv)


def command(argv: Sequence[str] | None, prog: str, epilog: str | None = None) -> int:
    """``fflayers recall``: the same, named ``prog``."""
    return run_command(prog, build_parser, run, argv, epilog, subcommands=tuple(SUBCOMMANDS))


