"""Figures (PNG + PDF) and per-layer summary tables of the key-value memory analyses.

Inputs: the agreement table of ``key_value_agreement.py`` (``--agreement_tsv``, with ``--baseline_tsv`` its
``_random.tsv`` for the random-values baseline) and/or ffn info tables of ``generate_outputs.py
--extract_ffn_info`` (``--ffn_info``: .pkl/.pickle, .parquet, .jsonl; layer mode also .tsv/.csv). Writes into
``--output_dir``:

* ``agreement_by_layer.{png,pdf,tsv}`` and ``confident_values_by_layer.{png,pdf}`` (agreement table);
* ``active_memories_by_layer``, ``top1_matches_by_layer`` (+ ``ffn_layer_summary.tsv``) for a layer-mode
  table;
* ``coefficients_by_layer`` for a dim-mode table.

Every file is written atomically. Example (``python analysis/plot_memories.py ...`` is the same)::

    fflayers memories plot --agreement_tsv kv.tsv --baseline_tsv kv_random.tsv \\
        --ffn_info layer_valid.pkl dim_valid.pkl --output_dir figures
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from fflayers.cli.common import CLIError, Parser, check_range, run_main
from fflayers.core import FflayersError

__all__ = ["PROG", "build_parser", "read_agreement", "read_ffn_info", "run", "main", "command"]

PROG = "plot_memories.py"


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    p.add_argument("--agreement_tsv", type=str, default=None,
                   help="OUTPUT_BASE.tsv of key_value_agreement.py")
    p.add_argument("--baseline_tsv", type=str, default=None,
                   help="OUTPUT_BASE_random.tsv (random-values baseline)")
    p.add_argument("--ffn_info", nargs="*", default=[], help="ffn info tables (layer and/or dim mode)")
    p.add_argument("--output_dir", type=str, default=None, help="folder for the figures (created if missing)")
    p.add_argument("--d_ff", type=int, default=None,
                   help="FFN width, for shares when a table does not record it")
    p.add_argument("--top_n", type=int, default=100, help="most confident values to locate (default 100)")
    p.add_argument("--formats", nargs="+", default=["png", "pdf"], choices=["png", "pdf", "svg"])
    p.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
                   help="read .pkl tables in full (a pickle can run code: only for files you trust)")
    return p


def read_agreement(path: str):
    """An agreement table (tab-separated whatever its name; token strings such as "nan" stay strings)."""
    from fflayers.io import read_table
    from fflayers.memories.agreement import AGREEMENT_COLUMNS

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"agreement table {p} does not exist; pass OUTPUT_BASE.tsv of key_value_agreement.py")
    try:
        table = read_table(p, as_suffix=".tsv", keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as err:
        raise CLIError(f"cannot read {p} as a tab-separated table ({str(err).splitlines()[0]})") from None
    missing = [c for c in AGREEMENT_COLUMNS if c not in table.columns]
    if missing:
        raise CLIError(f"{p} is not an agreement table (missing {', '.join(missing)}); "
                       "pass key_value_agreement.py output")
    return table


def read_ffn_info(path: str, trust: bool = False):
    """An ffn info table and its mode (``"layer"`` or ``"dim"``); pickles are read by the restricted unpickler
    (names outside pandas/numpy are refused, never called) unless ``trust``."""
    import pandas as pd

    from fflayers.io import read_table, table_suffix

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"ffn info table {p} does not exist; pass the --output_file of generate_outputs.py")
    table_suffix(p, "--ffn_info")
    try:
        table = read_table(p, trust=trust)
    except FflayersError:  # a refused pickle
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is bad input here
        reason = str(err).splitlines()[0] if str(err) else ""
        raise CLIError(f"cannot read {p} ({type(err).__name__}: {reason})") from None
    if not isinstance(table, pd.DataFrame) or "layer" not in table.columns:
        raise CLIError(f"{p} is not an ffn info table; pass the output of generate_outputs.py "
                       "--extract_ffn_info")
    if "coefficients" in table.columns:
        if len(table) and isinstance(table["coefficients"].iloc[0], str):
            raise CLIError(f"{p}: dim-mode tables need a format that keeps arrays (.pkl, .parquet, .jsonl)")
        return "dim", table
    if "active_memories" in table.columns:
        return "layer", table
    raise CLIError(f"{p} is not an ffn info table (columns {', '.join(map(str, table.columns[:6]))}...); "
                   "--ffn_info takes layer-mode tables (generate_outputs.py --extract_ffn_info "
                   "--extract_mode layer) and dim-mode tables (--extract_mode dim)")


def prepare_output_dir(path: str) -> Path:
    from fflayers.io import check_folder_writable

    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create output folder {out} ({err.strerror}); "
                       "choose another --output_dir") from None
    check_folder_writable(out)
    return out


def run(args: argparse.Namespace) -> list[Path]:
    from fflayers.io import write_table
    from fflayers.memories.agreement import agreement_by_layer
    from fflayers.memories.ffn_info import ffn_info_by_layer
    from fflayers.plots import (
        plot_active_memories,
        plot_agreement,
        plot_coefficients,
        plot_confident_values,
        plot_top1_matches,
        save_figure,
    )

    if not args.agreement_tsv and not args.ffn_info:
        raise CLIError("nothing to plot: pass --agreement_tsv and/or --ffn_info")
    if args.baseline_tsv and not args.agreement_tsv:
        raise CLIError("--baseline_tsv goes with --agreement_tsv")
    if not args.output_dir:
        raise CLIError("--output_dir is required")
    if args.top_n < 1:
        raise CLIError(f"--top_n {args.top_n} must be >= 1")
    check_range(args, "d_ff", 1, why="the FFN width of the model the tables come from")
    # read everything before writing anything
    agreement = read_agreement(args.agreement_tsv) if args.agreement_tsv else None
    baseline = read_agreement(args.baseline_tsv) if args.baseline_tsv else None
    infos = [read_ffn_info(p, trust=args.trust_checkpoint) for p in args.ffn_info]
    out = prepare_output_dir(args.output_dir)
    written: list[Path] = []
    fmts = args.formats
    if agreement is not None:
        summary = agreement_by_layer(agreement)
        base = agreement_by_layer(baseline) if baseline is not None else None
        written += save_figure(plot_agreement(summary, base), out / "agreement_by_layer", fmts)
        written += save_figure(plot_confident_values(agreement, args.top_n),
                               out / "confident_values_by_layer", fmts)
        if base is not None:
            summary = summary.merge(base[["layer", "top1_in_targets", "agreement_rate"]], on="layer",
                                    how="left", suffixes=("", "_random"))
        write_table(out / "agreement_by_layer.tsv", summary)
        written.append(out / "agreement_by_layer.tsv")
    for i, (mode, table) in enumerate(infos):
        suffix = "" if sum(m == mode for m, _ in infos) == 1 else f"_{i}"
        if mode == "layer":
            summary = ffn_info_by_layer(table, args.d_ff)
            written += save_figure(plot_active_memories(table, args.d_ff),
                                   out / f"active_memories_by_layer{suffix}", fmts)
            written += save_figure(plot_top1_matches(summary), out / f"top1_matches_by_layer{suffix}", fmts)
            write_table(out / f"ffn_layer_summary{suffix}.tsv", summary)
            written.append(out / f"ffn_layer_summary{suffix}.tsv")
        else:
            written += save_figure(plot_coefficients(table), out / f"coefficients_by_layer{suffix}", fmts)
    return written


def run_counting(prog: str, build: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None) -> int:
    """Run as ``prog``, then say how many files were written; returns the exit code."""
    written: list[Path] = []
    code = run_main(prog, build, lambda args: written.extend(run(args)), argv)
    if code == 0:
        print(f"{prog}: wrote {len(written)} files")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``plot_memories.py``; returns the exit code (2 for bad input, one line on stderr)."""
    return run_counting(PROG, build_parser, argv)


def command(argv: Sequence[str] | None, prog: str, epilog: str | None = None) -> int:
    """``fflayers memories plot``: the same, named ``prog``."""
    return run_counting(prog, lambda: build_parser(prog, epilog), argv)
