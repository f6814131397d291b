"""Running the units of a plan: over torchrun ranks and job-array jobs, resumable from a run folder.

:func:`run_units` is called on every rank with the same task and config. Without a run folder it plans the
units, computes this worker's shards and merges on rank 0. With a run folder (``--resume``, ``--shard I/N``)
the plan lives in the manifest: finished shards are skipped and loaded, whatever killed the earlier run and
whatever the number of workers now (the stored plan is kept; the shards left are split over the workers
now), and the state of each shard is saved as it finishes. A finished shard whose file is missing,
truncated, corrupt or of another hash is computed again, with a :class:`RecomputeWarning`; it is never
merged and never fatal.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fflayers.core import FflayersError, RunStateError
from fflayers.distributed import barrier, broadcast_from_main, dist_info, gather_to_main, shard_range
from fflayers.runs.fingerprints import config_dict, config_hash
from fflayers.runs.manifest import Manifest
from fflayers.runs.plan import SHARD_WEIGHT, make_plan
from fflayers.runs.shards import ShardFileError, load_shard, save_shard, shard_file_intact

__all__ = ["UnitTask", "Workers", "RunResult", "RecomputeWarning", "resume_key", "run_units"]


class UnitTask(Protocol):
    """What :func:`run_units` needs from an analysis: its units, how to compute and merge partial results."""

    n_units: int  # fixed by the data (and the settings), never by the number of processes

    def unit_weight(self, unit: int) -> float: ...  # sentences, facts, ... of a unit (plan, progress)

    def run_units(self, units: range, progress: Callable[[int], object]) -> Any: ...  # a partial result

    def merge(self, parts: list[Any]) -> Any: ...  # associative, and independent of the order of the parts

    def to_state(self, part: Any) -> Any: ...  # what a shard file stores (tensors, tables, plain data)

    def from_state(self, state: Any) -> Any: ...


class RecomputeWarning(RuntimeWarning):
    """A shard the manifest calls finished is computed again: its file cannot be used."""


@dataclass(frozen=True)
class Workers:
    """This process among all workers: job ``job`` of ``jobs`` (job arrays), rank ``rank`` of ``world``
    (torchrun). Worker ``w = job * world + rank`` takes the contiguous share ``w`` of the shards."""

    job: int = 0
    jobs: int = 1
    rank: int = 0
    world: int = 1

    @property
    def count(self) -> int:
        """All workers: jobs x ranks."""
        return self.jobs * self.world

    def job_shards(self, n_shards: int) -> list[int]:
        """The shards of this worker's job (those of its ranks)."""
        ranks = range(self.job * self.world, (self.job + 1) * self.world)
        return sorted({s for w in ranks for s in shard_range(n_shards, w, self.count)})

    def label(self) -> str:
        return f"job {self.job}/{self.jobs} rank {self.rank}/{self.world}"


@dataclass
class RunResult:
    """The merged result (on rank 0; None elsewhere and for a job without shards) and what was done."""

    result: Any
    plan: dict
    job_shards: list[int]
    computed: list[int] = field(default_factory=list)  # shards computed by this rank in this run
    reused: int = 0  # finished shards loaded from the run folder (rank 0)
    computed_all: int = 0  # shards computed by all ranks of this job in this run, recomputed too (rank 0)
    recomputed: list[int] = field(default_factory=list)  # finished shards whose files were unusable (rank 0)
    kind: str = ""
    config: dict = field(default_factory=dict)  # the resume key: options and fingerprints
    config_hash: str = ""
    workers: Workers = field(default_factory=Workers)


def resume_key(config: Any, fingerprints: Mapping[str, str] | None = None) -> dict:
    """The config as plain data (a dataclass through ``asdict``) with the ``fingerprints`` added."""
    key = config_dict(config)
    for name, value in (fingerprints or {}).items():
        if name in key and key[name] != value:
            raise ValueError(f"fingerprint {name!r} clashes with the config option of that name")
        key[name] = value
    return key


def _warn(message: str) -> None:
    warnings.warn(message, RecomputeWarning, stacklevel=3)


def _finished(run_dir: Path, manifest: Manifest, data: dict, shards: list[int]) -> list[int]:
    """The shards of ``shards`` finished with an intact file; the others the manifest calls done are reset."""
    done = []
    for s in shards:
        entry = data["shards"][s]
        if entry["status"] != "done":
            continue
        if shard_file_intact(run_dir, s, entry):
            done.append(s)
            continue
        _warn(f"shard {s} of {run_dir} is marked done, but its file is missing or truncated; "
              "computing it again")
        manifest.update(s, status="pending")
    return done


def _compute(task: UnitTask, plan: dict, s: int, manifest: Manifest | None, chash: str, workers: Workers,
             progress: Callable[[int], object]) -> Any:
    """Shard ``s`` computed (and saved, with its status, when there is a run folder)."""
    u0, u1 = plan["shards"][s]
    t0 = time.time()
    if manifest is not None:
        manifest.update(s, status="running", worker=workers.label(), host=socket.gethostname(),
                        pid=os.getpid())
    part = task.run_units(range(u0, u1), progress)
    if manifest is not None:
        saved = save_shard(manifest.dir, s, chash, task.to_state(part))
        manifest.update(s, status="done", seconds=round(time.time() - t0, 3), **saved)
    return part


def run_units(
    task: UnitTask | Callable[[dict], UnitTask],
    config: Any,
    *,
    kind: str,
    run_dir: str | os.PathLike | None = None,
    workers: Workers | None = None,
    fingerprints: Mapping[str, str] | None = None,
    settings: Mapping[str, Any] | None = None,
    unit_name: str = "weight",
    shard_weight: float = SHARD_WEIGHT,
    total_weight: float | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> RunResult:
    """Compute this worker's shards of the run and merge them (see the module docstring); call on every rank.

    ``task``: the analysis, or ``settings -> task`` when the units depend on settings chosen at run time
    (an automatic batch size): ``settings`` (JSON data, rank 0's) are stored in the plan and a resume
    rebuilds the task with the stored ones. ``config`` (a dataclass or a mapping) and ``fingerprints``
    (model, data, input files) form the resume key; ``kind`` names the analysis. ``unit_name`` names the
    weight in the manifest and the progress bar; ``shard_weight`` and ``total_weight`` size the plan (see
    :func:`fflayers.runs.plan.make_plan`). Returns the job's merged result on rank 0.
    """
    from tqdm.auto import tqdm

    info = dist_info()
    workers = workers or Workers(rank=info.rank, world=info.world_size)
    key = resume_key(config, fingerprints)
    chash = config_hash(key)
    is_task = hasattr(task, "run_units") and not isinstance(task, type)
    build = (lambda _settings: task) if is_task else task
    settings = broadcast_from_main(config_dict(settings or {}))

    def plan_for(t: UnitTask) -> dict:
        weights = [t.unit_weight(u) for u in range(t.n_units)]
        plan = make_plan(weights, workers.count, shard_weight, unit_name, total_weight)
        return {**plan, "settings": settings}

    done: list[int] = []
    data: dict = {}
    manifest = None
    if run_dir is None:
        work = build(settings)
        plan = plan_for(work)
    else:
        run_dir = Path(run_dir)
        manifest = Manifest(run_dir)
        reply: tuple[str, Any] = ("ok", None)
        failure: Exception | None = None
        if info.is_main:
            try:
                data = manifest.open(kind, key, chash, lambda: plan_for(build(settings)))
                done = _finished(run_dir, manifest, data, workers.job_shards(data["plan"]["n_shards"]))
                reply = ("ok", (data, done))
            except Exception as err:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
                failure = err
                reply = ("error", (type(err) if isinstance(err, FflayersError) else RuntimeError, str(err)))
        reply = broadcast_from_main(reply)
        if reply[0] == "error":
            if failure is not None:
                raise failure
            raise reply[1][0](reply[1][1])
        data, done = reply[1]
        plan = data["plan"]
        work = build(plan.get("settings", {}))
        if work.n_units != plan["n_units"]:
            raise RunStateError(f"the plan in {run_dir} has {plan['n_units']} units, this run "
                                f"{work.n_units}; the data or settings changed: delete {run_dir} to start "
                                "over")

    job_shards = workers.job_shards(plan["n_shards"])
    finished = set(done)
    pending = [s for s in job_shards if s not in finished]
    mine = [pending[i] for i in shard_range(len(pending), workers.rank, workers.world)]
    barrier()  # every rank has read the manifest before anyone changes it

    total = sum(plan["shard_weights"][s] for s in mine)
    bar = tqdm(total=total, disable=not progress, unit=plan.get("unit_name", unit_name), desc=desc or kind)
    acc = None
    try:
        for s in mine:
            part = _compute(work, plan, s, manifest, chash, workers, bar.update)
            acc = part if acc is None else work.merge([acc, part])
    finally:
        bar.close()

    gathered = gather_to_main((None if acc is None else work.to_state(acc), len(mine)))
    out = RunResult(None, plan, job_shards, computed=list(mine), kind=kind, config=key, config_hash=chash,
                    workers=workers)
    if gathered is None:
        return out
    parts = [work.from_state(p) for p, _ in gathered if p is not None]
    out.computed_all = sum(n for _, n in gathered)
    for s in done:  # finished in an earlier run: loaded on rank 0, or computed again when unusable
        try:
            parts.append(work.from_state(load_shard(run_dir, s, chash, data["shards"][s].get("sha256"))))
            out.reused += 1
        except ShardFileError as err:
            _warn(f"{err}; computing shard {s} again")
            parts.append(_compute(work, plan, s, manifest, chash, workers, lambda _n: None))
            out.recomputed.append(s)
            out.computed_all += 1
    out.result = work.merge(parts) if parts else None
    return out
