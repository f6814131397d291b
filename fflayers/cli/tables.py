"""Result tables of the commands that run an analysis over facts: sharded runs with resume, output and
metadata, and reading a table back (``--input``). Table formats follow :data:`fflayers.io.TABLE_FORMATS`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fflayers.cli.common import CLIError, prog_name

__all__ = ["config_of", "write_output", "table_over_facts", "finish_table_run", "read_table",
           "check_table_output"]


def config_of(args: argparse.Namespace) -> dict:
    """The run's options (for metadata and resume checks)."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "quiet", "verbose")}


def write_output(args: argparse.Namespace, table: Any, inputs: dict | None = None) -> None:
    """Write the table (format from the extension) and ``OUTPUT.meta.json`` (hashes of the facts file and of
    ``inputs``, name -> path)."""
    from fflayers.io import run_metadata, write_json, write_table

    write_table(args.output, table)
    inputs = ({"facts": args.facts} if getattr(args, "facts", None) else {}) | (inputs or {})
    write_json(str(args.output) + ".meta.json", run_metadata(config_of(args), inputs=inputs))


def table_over_facts(args: argparse.Namespace, encoded: list, compute: Callable, shard_facts: int = 64,
                     unit: str = "fact") -> Any:
    """Run ``compute(encoded_part, on_facts_done) -> DataFrame`` over the facts in shards, with a progress
    bar; after each shard the rows so far go to ``OUTPUT.partial.parquet``, from which ``--resume`` continues
    (facts are matched by ``known_id``). Returns the concatenated table."""
    import pandas as pd
    from tqdm.auto import tqdm

    from fflayers.io import read_table as read_table_file
    from fflayers.io import write_json, write_table

    partial = Path(str(args.output) + ".partial.parquet")
    partial_meta = Path(str(args.output) + ".partial.json")
    config = json.loads(json.dumps(config_of(args), default=str))
    parts = []
    done: set = set()
    if args.resume and partial.is_file():
        saved = json.loads(partial_meta.read_text()) if partial_meta.is_file() else None
        if saved != config:
            raise CLIError(f"{partial} was made with other options; rerun without --resume")
        parts.append(read_table_file(partial))
        done = set(parts[0]["known_id"].tolist())
        print(f"{prog_name()}: resuming: {len(done)} facts already done")
    todo = [e for e in encoded if e.fact.known_id not in done]
    bar = tqdm(total=len(encoded), initial=len(encoded) - len(todo), unit=unit, desc=args.command,
               disable=args.quiet)
    for start in range(0, len(todo), shard_facts):
        parts.append(compute(todo[start : start + shard_facts], bar.update))
        if start + shard_facts < len(todo):
            write_json(partial_meta, config)
            write_table(partial, pd.concat(parts, ignore_index=True))
    bar.close()
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    order = {e.fact.known_id: i for i, e in enumerate(encoded)}
    if "known_id" in table:
        table = table.iloc[table["known_id"].map(order).argsort(kind="stable")].reset_index(drop=True)
    return table


def finish_table_run(args: argparse.Namespace, table: Any, inputs: dict | None = None) -> None:
    """Write the result and metadata, then remove the partial files."""
    write_output(args, table, inputs)
    for suffix in (".partial.parquet", ".partial.json"):
        Path(str(args.output) + suffix).unlink(missing_ok=True)
    print(f"{prog_name()}: {len(table)} rows -> {args.output}")


def read_table(path: str | Path) -> Any:
    """A result table (``--input``), in the format of its extension."""
    from fflayers.io import read_table as read_table_file
    from fflayers.io import table_suffix

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--input {path} does not exist; run the analysis first")
    table_suffix(path, "--input")
    return read_table_file(path)


def check_table_output(args: argparse.Namespace) -> None:
    """``--output`` must name a table format (checked before any model loads)."""
    from fflayers.io import table_suffix

    table_suffix(args.output, "--output")
