"""The export of every FF value's (and key's) top-k tokens as a run of :mod:`fflayers.runs`.

The units are the (layer, side, block of :data:`CHUNK` neurons) of the table, in its row order; a unit's
result is its rows, and a shard's file holds the rows of its units. The shards stay on disk, in the run
folder (``OUTPUT.ckpt`` with ``--resume``; else a hidden temporary folder beside the output, removed at the
end, which only a killed process leaves behind): the merge only collects which units are done, and
:func:`export_table` writes the output by streaming the shards' rows in unit order (a parquet file row group
by row group, as :func:`fflayers.io.write_table` writes chunks; the other formats from one table), so memory
holds the rows of one shard at a time and the file is the one a single pass writes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError, RunStateError
from fflayers.distributed import broadcast_from_main, dist_info
from fflayers.embedding_space.projections import SIDES, neuron_token_chunk, neuron_vectors
from fflayers.embedding_space.vocabulary import Embedding
from fflayers.runs import Manifest, RunResult, load_shard, model_fingerprint, register_merge, run_units

__all__ = ["KIND", "CHUNK", "ExportConfig", "ExportPart", "ExportTask", "embedding_digest", "export_table",
           "merge_export_states"]

KIND = "embedding_export"
#: Neurons per unit (one table of :func:`~fflayers.embedding_space.projections.iter_neuron_tokens`).
CHUNK = 1024


@dataclass(frozen=True)
class ExportConfig:
    """What the exported rows depend on (the resume key, with the model and embedding fingerprints)."""

    layers: list[int]
    sides: list[str]
    k: int
    embedding: str
    chunk: int = CHUNK


@dataclass
class ExportPart:
    """Units done and, straight from a shard's computation, their rows (one table per unit); merged parts
    hold no rows: those stay in the shard files."""

    units: list[int]
    frames: list[pd.DataFrame] | None = None


class ExportTask:
    """A :class:`fflayers.runs.UnitTask`: the top-``k`` tokens of every neuron of ``layers`` and ``sides``."""

    def __init__(self, adapter: LMAdapter, E: Embedding, config: ExportConfig) -> None:
        V = E.matrix.shape[0]
        if not 1 <= config.k <= V:
            raise InputError(f"k = {config.k} must be between 1 and the vocabulary size {V}")
        bad = [s for s in config.sides if s not in SIDES]
        if bad:
            raise InputError(f"unknown side {bad[0]!r}; use 'key' or 'value'")
        self.adapter, self.config = adapter, config
        self.units = [(adapter.check_layer(layer), side, start) for layer in config.layers
                      for side in config.sides for start in range(0, adapter.d_ff, config.chunk)]
        self.n_units = len(self.units)
        self.tokens = np.asarray(adapter.vocab.tokens, dtype=object)
        self.Et = E.matrix.float().T

    def unit_weight(self, unit: int) -> int:
        start = self.units[unit][2]
        return min(self.config.chunk, self.adapter.d_ff - start) * self.config.k

    def run_units(self, units: range, progress: Callable[[int], object]) -> ExportPart:
        frames = []
        for u in units:
            layer, side, start = self.units[u]
            vecs = neuron_vectors(self.adapter, layer, side)
            neurons = range(start, min(start + self.config.chunk, self.adapter.d_ff))
            frames.append(neuron_token_chunk(vecs, self.Et, self.tokens, layer, side, neurons, self.config.k))
            progress(len(frames[-1]))
        return ExportPart(list(units), frames)

    def merge(self, parts: list[ExportPart]) -> ExportPart:
        return ExportPart(sorted(u for part in parts for u in part.units))

    def to_state(self, part: ExportPart) -> dict:
        return {"units": list(part.units), "frames": part.frames}

    def from_state(self, state: dict) -> ExportPart:
        return ExportPart(list(state["units"]))  # rows: read again when the table is written


def merge_export_states(states: list[dict]) -> dict:
    """Export states with their rows merged: all units and their tables, in unit order."""
    pairs: dict[int, pd.DataFrame] = {}
    for state in states:
        if state["frames"] is None:
            raise RunStateError("an export state without its rows cannot be merged; merge shard states")
        pairs.update(zip(state["units"], state["frames"], strict=True))
    units = sorted(pairs)
    return {"units": units, "frames": [pairs[u] for u in units]}


register_merge(KIND, merge_export_states)


@torch.no_grad()
def embedding_digest(E: Embedding) -> str:
    """SHA-256 of the projection matrix (as float32), read block by block."""
    h = hashlib.sha256()
    for block in E.matrix.split(8192):
        h.update(block.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def shard_rows(run_dir: Path, run: RunResult) -> Iterator[pd.DataFrame]:
    """The rows of a finished export run, shard by shard in unit order, read from its shard files."""
    if run.result is None or run.result.units != list(range(run.plan["n_units"])):
        raise RunStateError(f"the export run in {run_dir} is missing units; rerun with --resume")
    data = Manifest(run_dir).read() or {"shards": []}
    for s, entry in enumerate(data["shards"]):
        yield from load_shard(run_dir, s, run.config_hash, entry.get("sha256"))["frames"]


def export_table(adapter: LMAdapter, E: Embedding, output: str | os.PathLike, config: ExportConfig,
                 resume: bool = False, progress: bool = True) -> tuple[int, RunResult]:
    """Compute the export (call on every rank) and write it to ``output`` on rank 0 (any format of
    :func:`fflayers.io.write_table`); returns the row count (0 on other ranks) and the run.

    With ``resume`` the shards are kept in ``OUTPUT.ckpt`` until the output is written, and a rerun continues
    from them; without, in a temporary folder beside ``output``, removed whatever happens.
    """
    from fflayers.io import write_table

    output = Path(output)
    main = dist_info().is_main
    if resume:
        run_dir = Path(f"{output}.ckpt")
    else:
        made = tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".run") if main else None
        run_dir = Path(broadcast_from_main(made))
    finished = False
    try:
        task = ExportTask(adapter, E, config)
        prints = {"model": model_fingerprint(adapter), "embedding_matrix": embedding_digest(E)}
        run = run_units(task, config, kind=KIND, run_dir=run_dir, fingerprints=prints, unit_name="rows",
                        progress=progress, desc="export")
        rows = 0
        if main:
            rows = write_table(output, shard_rows(run_dir, run), chunked=True)
        finished = True
        return rows, run
    finally:
        if main and (finished or not resume):
            shutil.rmtree(run_dir, ignore_errors=True)
