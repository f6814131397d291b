"""Merge the partial results of a job array (``generate_outputs.py ... --shard I/N``) into the file a single run
writes.

    python analysis/merge_shards.py --output_file top50_train.jsonl      # finds top50_train.jsonl.shard-*-of-N.pt
    python analysis/merge_shards.py --output_file out.jsonl --partials a.shard-0-of-2.pt a.shard-1-of-2.pt

The N partials must come from one configuration (same model, data, settings and plan) and cover jobs 0..N-1
once each; anything else stops with a one-line error and no output. The merged output gets its
``.meta.json`` (the run's config, with the jobs' shards); ``--keep`` keeps the partials and the run folder
(``OUTPUT_FILE.ckpt``), which are otherwise removed after a successful merge.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from fflayers.cli import CLIError, Parser, run_main

PROG = "merge_shards.py"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--output_file", type=str, required=True, help="the output file the jobs were given")
    p.add_argument("--partials", nargs="*", default=None, help="partial files (default: OUTPUT_FILE.shard-*-of-*.pt)")
    p.add_argument("--keep", action="store_true", help="keep the partials and the run folder")
    return p


def run(args: argparse.Namespace) -> None:
    from fflayers.io import check_writable, run_metadata, write_json
    from fflayers.memories.partials import find_partials, merge_partials, write_scan_output

    output = check_writable(args.output_file)
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
    print(f"{PROG}: merged {len(paths)} partials into {output}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, with one line on stderr)."""
    return run_main(PROG, build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
