"""Sharded corpus scans (trigger mining, FFN info) on :mod:`fflayers.runs`.

A scan's units are length-bucketed batches of sentences (or blocks of them), weighed by their sentences
(a scan is a :class:`fflayers.runs.UnitTask` whose ``unit_weight`` counts sentences); :func:`run_scan` runs
them with :func:`fflayers.runs.run_units` over torchrun ranks and job-array jobs, with the run folder's
manifest for ``--resume`` and ``--shard I/N``. What is scan-specific stays here: its config
(:class:`ScanConfig`), the batch size agreed by all ranks and kept in the plan, and :func:`auto_batch_tokens`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fflayers.backends.base import LMAdapter
from fflayers.distributed import gather_objects
from fflayers.runs import RunResult, UnitTask, Workers, run_units

SHARD_SENTENCES = 10_000

__all__ = ["ScanConfig", "run_scan", "auto_batch_tokens", "SHARD_SENTENCES"]


@dataclass(frozen=True)
class ScanConfig:
    """What a scan computes: with the model and data fingerprints its resume key (``asdict``), and the
    header of its job-array partials. ``kind``: ``"trigger_examples"`` or ``"ffn_info"``; ``k`` the trigger
    examples per key (None for ffn info); ``batch_tokens`` as asked (None: chosen from the device);
    ``mode``, ``seed``: the ffn-info mode and its position seed (the command line records them for mining
    too); ``dtype``: the autocast dtype (None: the model's)."""

    kind: str
    layers: list[int]
    dims: list[int]
    n_sentences: int
    k: int | None = None
    batch_tokens: int | None = None
    mode: str | None = None
    seed: int | None = None
    dtype: str | None = None


def run_scan(
    make_task: Callable[[int], UnitTask],
    batch_tokens: int,
    config: ScanConfig,
    fingerprints: Mapping[str, str] | None = None,
    run_dir: str | os.PathLike | None = None,
    workers: Workers | None = None,
    progress: bool = True,
    desc: str = "scan",
    shard_sentences: int = SHARD_SENTENCES,
) -> RunResult:
    """Run the shards of this worker and merge (see :func:`fflayers.runs.run_units`); call on every rank.

    ``make_task(batch_tokens)`` builds the task; ``batch_tokens`` is this rank's choice (the smallest over the
    ranks is used, or the one stored in the run folder's plan). ``config`` and ``fingerprints`` (``model``,
    ``data``) identify the run. Returns the merged result of the job's shards on rank 0;
    ``plan["batch_tokens"]`` is the batch size used.
    """
    batch_tokens = min(gather_objects(int(batch_tokens)))
    out = run_units(lambda settings: make_task(int(settings["batch_tokens"])), config, kind=config.kind,
                    run_dir=run_dir, workers=workers, fingerprints=fingerprints,
                    settings={"batch_tokens": batch_tokens}, unit_name="sentences",
                    shard_weight=shard_sentences, total_weight=config.n_sentences, progress=progress,
                    desc=desc)
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
