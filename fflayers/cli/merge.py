"""Merge the partial results of a job array (``generate_outputs.py ... --shard I/N``) into the file a single
run writes.

    fflayers merge --output_file top50_train.jsonl      # finds top50_train.jsonl.shard-*-of-N.pt
    fflayers merge --output_file out.jsonl --partials a.shard-0-of-2.pt a.shard-1-of-2.pt

(``python analysis/merge_shards.py ...`` is the same.) The N partials must come from one configuration (same
model, data, settings and plan) and cover jobs 0..N-1 once each; anything else stops with a one-line error and
no output. The merged output gets its ``.meta.json`` (the run's config, with the jobs' shards); ``--keep``
keeps the partials and the run folder (``OUTPUT_FILE.ckpt``), which are otherwise removed after a successful
merge.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from fflayers.cli.common import CLIError, Parser, prog_name, run_command, run_main

__all__ = ["PROG", "build_parser", "run", "main", "command"]

PROG = "merge_shards.py"


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    p.add_argument("--output_file", type=str, required=True, help="the output file the jobs were given")
    p.add_argument("--partials", nargs="*", default=None,
                   help="partial files (default: OUTPUT_FILE.shard-*-of-*.pt)")
    p.add_argument("--keep", action="store_true", help="keep the partials and the run folder")
    return p


def run(args: argparse.Namespace) -> None:
    from fflayers.io import check_writable, run_metadata, table_suffix, write_json
    from fflayers.memories.partials import find_partials, merge_partials, write_scan_output

    output = check_writable(args.output_file)
    table_suffix(output, "--output_file")  # as the jobs checked it
    paths = [Path(p) for p in args.partials] if args.partials else find_partials(output)
    if not paths:
        raise CLIError(f"no partials {output}.shard-I-of-N.pt found; run the jobs with --shard I/N first, "
                       "or pass --partials")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CLIError(f"partial {missing[0]} does not exist; pass the files the jobs wrote")
    header, state, texts = merge_partials(paths)
    write_scan_output(output, header["kind"], state, header["config"], texts)
    meta = dict(header["meta"])
    meta.update(jobs=header["jobs"], merged_from=[p.name for p in paths])
    inputs = {"data_file": header["data_file"]} if Path(header.get("data_file", "")).is_file() else None
    write_json(str(output) + ".meta.json", run_metadata(meta, inputs=inputs))
    if not args.keep:
        for p in paths:
            p.unlink(missing_ok=True)
        shutil.rmtree(str(output) + ".ckpt", ignore_errors=True)
    print(f"{prog_name()}: merged {len(paths)} partials into {output}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``merge_shards.py``; returns the exit code (2 for bad input, one line on stderr)."""
    return run_main(PROG, build_parser, run, argv)


def command(argv: Sequence[str] | None, prog: str, epilog: str | None = None) -> int:
    """``fflayers merge``: the same, named ``prog``."""
    return run_command(prog, build_parser, run, argv, epilog)
