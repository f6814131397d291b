"""Sharded corpus scans (trigger mining, FFN info) on :mod:`fflayers.runs`.

A scan's units are length-bucketed batches of sentences (or blocks of them), weighed by their sentences;
:func:`run_scan` runs them with :func:`fflayers.runs.run_units` over torchrun ranks and job-array jobs, with
the run folder's manifest for ``--resume`` and ``--shard I/N``. What is scan-specific stays here: the
:class:`ScanTask` protocol (units counted in sentences), the batch size agreed by all ranks and kept in the
plan, and :func:`auto_batch_tokens`. The generic names are re-exported for the callers of this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from fflayers.backends.base import LMAdapter
from fflayers.distributed import gather_objects
from fflayers.runs import (
    FORMAT,
    MANIFEST,
    SHARDS_PER_WORKER,
    Manifest,
    RunResult,
    Workers,
    choose_n_shards,
    config_hash,
    group_units,
    load_shard,
    model_fingerprint,
    run_units,
    shard_file,
)
from fflayers.runs import data_digest as sentences_digest
from fflayers.runs import make_plan as plan_units

SHARD_SENTENCES = 10_000
#: The result of :func:`run_scan` (its former name).
ScanResult = RunResult

__all__ = ["ScanTask", "ScanResult", "Workers", "choose_n_shards", "group_units", "model_fingerprint",
           "sentences_digest", "config_hash", "Manifest", "run_scan", "shard_file", "auto_batch_tokens",
           "FORMAT", "MANIFEST", "SHARD_SENTENCES", "SHARDS_PER_WORKER", "SentenceUnits", "make_plan"]


class ScanTask(Protocol):
    """What :func:`run_scan` needs from a scan: its units and how to compute and merge partial results."""

    kind: str
    n_units: int

    def unit_sentences(self, unit: int) -> int: ...  # sentences in a unit (progress, plan)

    def run_units(self, units: range, progress: Callable[[int], None]) -> Any: ...  # a partial result (CPU)

    def merge(self, parts: list[Any]) -> Any: ...  # associative, and independent of the order of the parts

    def to_state(self, part: Any) -> Any: ...  # what a shard file stores

    def from_state(self, state: Any) -> Any: ...


class SentenceUnits:
    """A :class:`ScanTask` as a :class:`fflayers.runs.UnitTask`: units weighed by their sentences."""

    def __init__(self, scan: ScanTask) -> None:
        self.scan = scan
        self.n_units = scan.n_units

    def unit_weight(self, unit: int) -> int:
        return self.scan.unit_sentences(unit)

    def run_units(self, units: range, progress: Callable[[int], object]) -> Any:
        return self.scan.run_units(units, progress)

    def merge(self, parts: list[Any]) -> Any:
        return self.scan.merge(parts)

    def to_state(self, part: Any) -> Any:
        return self.scan.to_state(part)

    def from_state(self, state: Any) -> Any:
        return self.scan.from_state(state)


def make_plan(task: ScanTask, n_sentences: int, workers: int, shard_sentences: int = SHARD_SENTENCES) -> dict:
    """The plan of a scan's units for ``workers`` workers (see :func:`fflayers.runs.make_plan`)."""
    weights = [task.unit_sentences(u) for u in range(task.n_units)]
    return plan_units(weights, workers, shard_sentences, "sentences", n_sentences)


def _load_shard(run_dir: Path, chash: str, shard: int) -> Any:
    """The saved state of ``shard`` (see :func:`fflayers.runs.load_shard`)."""
    return load_shard(run_dir, shard, chash)


def run_scan(
    make_task: Callable[[int], ScanTask],
    batch_tokens: int,
    config: dict,
    n_sentences: int,
    run_dir: str | os.PathLike | None = None,
    workers: Workers | None = None,
    progress: bool = True,
    desc: str = "scan",
    shard_sentences: int = SHARD_SENTENCES,
) -> RunResult:
    """Run the shards of this worker and merge (see :func:`fflayers.runs.run_units`); call on every rank.

    ``make_task(batch_tokens)`` builds the task; ``batch_tokens`` is this rank's choice (the smallest over the
    ranks is used, or the one stored in the run folder's plan). ``config`` (JSON-able, with the model and data
    fingerprints; its ``"kind"`` names the analysis, else ``desc``) identifies the run. Returns the merged
    result of the job's shards on rank 0; ``plan["batch_tokens"]`` is the batch size used.
    """
    batch_tokens = min(gather_objects(int(batch_tokens)))
    out = run_units(lambda settings: SentenceUnits(make_task(int(settings["batch_tokens"]))), config,
                    kind=config.get("kind", desc), run_dir=run_dir, workers=workers,
                    settings={"batch_tokens": batch_tokens}, unit_name="sentences",
                    shard_weight=shard_sentences, total_weight=n_sentences, progress=progress, desc=desc)
    out.plan = {**out.plan, "batch_tokens": out.plan["settings"]["batch_tokens"]}
    return out


def auto_batch_tokens(adapter: LMAdapter, default: int = 4096, share: float = 0.5) -> int:
    """Padded tokens per batch: on CUDA from the free device memory (``share`` of it, at an estimated
    ``4 * (32 d_model + 8 d_ff)`` bytes of activations per token; a power of two in 1024 .. 2**20);
    ``default`` on other devices."""
    if adapter.device.type != "cuda":
        return default
    free, _total = torch.cuda.mem_get_info(adapter.device)
    per_token = 4 * (32 * adapter.d_model + 8 * adapter.d_ff)
    tokens = max(1, int(share * free / per_token))
    return int(min(1 << 20, max(1024, 1 << (tokens.bit_length() - 1))))
