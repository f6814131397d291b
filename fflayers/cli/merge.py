"""Merge the partial results of a job array (``generate_outputs.py ... --shard I/N``, or any analysis on
:mod:`fflayers.runs` that writes partials) into the output a single run writes.

    fflayers merge --output_file top50_train.jsonl      # finds top50_train.jsonl.shard-*-of-N.pt
    fflayers merge --output_file out.jsonl --partials a.shard-0-of-2.pt a.shard-1-of-2.pt

(``python analysis/merge_shards.py ...`` is the same.) The N partials must come from one analysis and one
configuration (same model, data, settings and plan) and cover jobs 0..N-1 once each; anything else stops with
a one-line error and no output. They merge through :func:`fflayers.runs.merge_partials` with the merge
registered for their kind, and the output is written by the writer registered with it
(:func:`fflayers.runs.register_merge`); the module that registers them is the one the partials name
(``header["module"]``, a module of fflayers; the corpus scans' for partials that name none). The merged
output gets its ``.meta.json`` (the run's config, with the jobs' shards) when the partials carry one;
``--keep`` keeps the partials and the run folder (``OUTPUT_FILE.ckpt``), which are otherwise removed after a
successful merge.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from fflayers.cli.common import CLIError, Parser, prog_name, run_command, run_main

__all__ = ["PROG", "SCANS_MODULE", "build_parser", "import_analysis", "run", "main", "command"]

PROG = "merge_shards.py"
#: the module of partials that name none (the corpus scans', which registers their merges and writers)
SCANS_MODULE = "fflayers.memories.partials"
_MODULE_NAME = re.compile(r"fflayers(\.[A-Za-z_][A-Za-z0-9_]*)+")


def build_parser(prog: str = PROG, epilog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0], epilog=epilog)
    p.add_argument("--output_file", type=str, required=True, help="the output file the jobs were given")
    p.add_argument("--partials", nargs="*", default=None,
                   help="partial files (default: OUTPUT_FILE.shard-*-of-*.pt)")
    p.add_argument("--keep", action="store_true", help="keep the partials and the run folder")
    return p


def import_analysis(path: Path, header: dict) -> None:
    """Import the module a partial names (``header["module"]``), which registers its kind's merge and
    writer; only modules of fflayers are imported."""
    module = header.get("module", SCANS_MODULE)
    if not isinstance(module, str) or not _MODULE_NAME.fullmatch(module):
        raise CLIError(f"partial {path} names the module {module!r}, which is not a module of fflayers; "
                       "pass the partials an fflayers analysis wrote")
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise CLIError(f"partial {path} names the module {module}, which cannot be imported ({err}); merge "
                       "with the version of fflayers that wrote it") from None


def run(args: argparse.Namespace) -> None:
    from fflayers.io import check_writable, run_metadata, table_suffix, write_json
    from fflayers.runs import find_partials, merge_partials, merged_writer, read_partial

    output = check_writable(args.output_file)
    paths = [Path(p) for p in args.partials] if args.partials else find_partials(output)
    if not paths:
        table_suffix(output, "--output_file")  # what the scans' jobs checked
        raise CLIError(f"no partials {output}.shard-I-of-N.pt found; run the jobs with --shard I/N first, "
                       "or pass --partials")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CLIError(f"partial {missing[0]} does not exist; pass the files the jobs wrote")
    first = read_partial(paths[0])
    import_analysis(paths[0], first)
    write = merged_writer(first["kind"])
    del first
    merged = merge_partials(paths)
    write(output, merged)
    header = merged.header
    if isinstance(header.get("meta"), dict):
        meta = dict(header["meta"])
        meta.update(jobs=header["jobs"], merged_from=[p.name for p in paths])
        data_file = header.get("data_file")
        inputs = {"data_file": data_file} if data_file and Path(data_file).is_file() else None
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
