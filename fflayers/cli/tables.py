"""Result tables of the commands that run an analysis over facts: runs on :mod:`fflayers.runs`, output and
metadata, and reading a table back (``--input``). Table formats follow :data:`fflayers.io.TABLE_FORMATS`.

A run's units are blocks of facts in input order (``facts_per_unit`` each), one shard per block; a partial
result is a :class:`fflayers.runs.UnitPieces` of row blocks (its state merged by
:func:`fflayers.runs.merge_piece_states`, registered for each kind with :func:`register_table_kind`), so the
table (:func:`blocks_table`) is the same rows in the same order for any number of torchrun ranks and after
any resume. ``--resume`` keeps the run
folder ``OUTPUT.ckpt`` (manifest and shard files), removed once the output is written; its resume key is the
subcommand's config (:mod:`fflayers.cli.recall_configs`: the options that change the rows), the block size,
the model fingerprint and the content digest of each input file (facts or countries list, paragraphs, ...),
never their paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fflayers.cli.common import CLIError, prog_name
from fflayers.runs.accumulators import PiecesTask, UnitPieces

if TYPE_CHECKING:
    from fflayers.backends.base import LMAdapter

__all__ = ["FactBlocks", "blocks_table", "check_table_output", "finish_table_run", "input_files",
           "read_table", "register_table_kind", "run_folder", "table_over_facts", "write_output"]


def input_files(args: argparse.Namespace, inputs: Mapping[str, str | os.PathLike] | None = None) -> dict:
    """Name -> path of the files a run reads: the facts (``--facts``, or the countries list of
    ``--countries``) and ``inputs``."""
    files: dict = {}
    if getattr(args, "facts", None):
        files["facts"] = args.facts
    elif getattr(args, "countries", False):
        from fflayers.data.countries import COUNTRIES_FILE

        files["countries_file"] = args.countries_file or COUNTRIES_FILE
    return files | dict(inputs or {})


def run_folder(args: argparse.Namespace) -> Path:
    """The run folder of ``--resume``: ``OUTPUT.ckpt``."""
    return Path(str(args.output) + ".ckpt")


def write_output(args: argparse.Namespace, table: Any, config: Any, inputs: dict | None = None) -> None:
    """Write the table (format from the extension) and ``OUTPUT.meta.json``: ``config`` (a dataclass, as in
    the resume key), ``where`` (paths, the model and how it was loaded), hashes of the facts file and of
    ``inputs`` (name -> path)."""
    from fflayers.cli.common import where_of
    from fflayers.io import run_metadata, write_json, write_table

    write_table(args.output, table)
    inputs = ({"facts": args.facts} if getattr(args, "facts", None) else {}) | (inputs or {})
    meta = run_metadata(dataclasses.asdict(config), inputs=inputs) | {"where": where_of(args)}
    write_json(str(args.output) + ".meta.json", meta)


def blocks_table(pieces: Any) -> Any:
    """The row blocks of :class:`fflayers.runs.UnitPieces` (or of its saved state) concatenated in unit
    order (an empty table for none)."""
    import pandas as pd

    from fflayers.runs import UnitPieces, from_state

    if pieces is not None and not isinstance(pieces, UnitPieces):
        pieces = from_state(UnitPieces, pieces)
    tables = pieces.pieces() if pieces is not None else []
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def register_table_kind(kind: str) -> None:
    """Register the merge of ``kind``'s states (:mod:`fflayers.runs.partials`)."""
    from fflayers.runs import merge_piece_states, register_merge

    register_merge(kind, merge_piece_states)


class FactBlocks(PiecesTask):
    """A :class:`fflayers.runs.UnitTask`: ``compute(facts, on_facts_done) -> rows`` over blocks of
    ``facts_per_unit`` of ``encoded`` (in input order), one call per block."""

    def __init__(self, encoded: Sequence, compute: Callable[[list, Callable[[int], object]], Any],
                 facts_per_unit: int) -> None:
        if facts_per_unit < 1:
            raise ValueError(f"facts_per_unit {facts_per_unit} must be >= 1")
        self.encoded = list(encoded)
        self.compute = compute
        self.size = facts_per_unit
        self.n_units = -(-len(self.encoded) // facts_per_unit)

    def block(self, unit: int) -> list:
        """The facts of ``unit``."""
        return self.encoded[unit * self.size : (unit + 1) * self.size]

    def unit_weight(self, unit: int) -> int:
        return len(self.block(unit))

    def run_units(self, units: range, progress: Callable[[int], object]) -> UnitPieces:
        out = UnitPieces()
        for u in units:
            out.add(u, self.compute(self.block(u), progress))
        return out


def table_over_facts(args: argparse.Namespace, adapter: LMAdapter, encoded: Sequence, compute: Callable, *,
                     kind: str, config: Any, facts_per_unit: int = 64,
                     inputs: Mapping[str, str | os.PathLike] | None = None) -> Any:
    """Run ``compute(facts, on_facts_done) -> DataFrame`` over blocks of the facts (a run of ``kind``) with
    :func:`fflayers.runs.run_units`: over the torchrun ranks, and with ``--resume`` from and into the run
    folder ``OUTPUT.ckpt``; ``config`` (a dataclass) and the block size are the resume key. ``inputs`` (name
    -> path) are the input files read besides the facts. Returns the table, its rows in input order, on rank
    0; None on the other ranks."""
    from fflayers.distributed import dist_info
    from fflayers.runs import file_digest, model_fingerprint, run_units

    info = dist_info()
    run_dir = run_folder(args) if args.resume else None
    fingerprints = {"model": model_fingerprint(adapter)}
    fingerprints |= {name: file_digest(path) for name, path in input_files(args, inputs).items()}
    key = {**dataclasses.asdict(config), "facts_per_unit": facts_per_unit}
    done = run_units(FactBlocks(encoded, compute, facts_per_unit), key, kind=kind,
                     run_dir=run_dir, fingerprints=fingerprints, unit_name="facts",
                     shard_weight=facts_per_unit, progress=not args.quiet, desc=args.command)
    if not info.is_main:
        return None
    if run_dir is not None or info.enabled:
        ranks = f" on {info.world_size} ranks" if info.enabled else ""
        print(f"{prog_name()}: {done.plan['n_shards']} shard(s) of {len(encoded)} facts{ranks}; "
              f"computed {done.computed_all}, reused {done.reused} finished shard(s)")
    return blocks_table(done.result)


def finish_table_run(args: argparse.Namespace, table: Any, config: Any, inputs: dict | None = None) -> None:
    """Write the result and metadata, then remove the run folder (``--resume``)."""
    write_output(args, table, config, inputs)
    if args.resume:
        shutil.rmtree(run_folder(args), ignore_errors=True)
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
