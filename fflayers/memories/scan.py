"""Sharded corpus scans: one plan of work, split over torchrun ranks and job-array jobs, with a resumable manifest.

A scan (trigger mining, FFN info, ...) is a list of *units* fixed by the data alone (length-bucketed batches, or
blocks of them): the same units are computed whatever the number of processes, so a sharded run does the same
floating-point work as a one-process run. Units are grouped into contiguous *shards*; their number is chosen
from the sentence count and the number of workers (at least four shards per worker, about ``shard_sentences``
sentences each), so every worker gets work even on a few hundred sentences. Worker ``w`` of ``W`` (``W`` = jobs x
ranks) takes a contiguous share of the shards; partial results are merged with the task's own (associative) merge,
whatever their order.

With a run folder (``--resume``, ``--shard``) the plan lives in ``manifest.json`` (config, model and data
fingerprints, per-shard status) and every finished shard's result in ``shard-NNNNN.pt``: a rerun skips finished
shards, whatever killed the run and whatever the new number of workers (the stored plan is kept; the shards left
are split over the new workers), and a rerun with another configuration is refused. The manifest is updated
under a file lock, so the jobs of a job array can share it (on a shared file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fflayers.backends.base import AdapterError, LMAdapter
from fflayers.distributed import (
    barrier,
    broadcast_from_main,
    dist_info,
    gather_objects,
    gather_to_main,
    shard_range,
)
from fflayers.safe_pickle import UnsafePickleError, torch_load_restricted

MANIFEST = "manifest.json"
FORMAT = "fflayers-scan/1"
SHARD_SENTENCES = 10_000
SHARDS_PER_WORKER = 4

__all__ = ["ScanTask", "ScanResult", "Workers", "choose_n_shards", "group_units", "model_fingerprint",
           "sentences_digest", "config_hash", "Manifest", "run_scan", "shard_file", "auto_batch_tokens"]


class ScanTask(Protocol):
    """What :func:`run_scan` needs from a scan: its units and how to compute and merge partial results."""

    kind: str
    n_units: int

    def unit_sentences(self, unit: int) -> int: ...  # sentences in a unit (progress, plan)

    def run_units(self, units: range, progress: Callable[[int], None]) -> Any: ...  # a partial result (CPU)

    def merge(self, parts: list[Any]) -> Any: ...  # associative, and independent of the order of the parts

    def to_state(self, part: Any) -> Any: ...  # what a shard file stores

    def from_state(self, state: Any) -> Any: ...


# ----- plan --------------------------------------------------------------------------------------------------


def choose_n_shards(n_units: int, n_sentences: int, n_workers: int, shard_sentences: int = SHARD_SENTENCES) -> int:
    """Shards of about ``shard_sentences`` sentences, at least ``SHARDS_PER_WORKER`` per worker, at most one per unit."""
    want = max(math.ceil(n_sentences / max(1, shard_sentences)), SHARDS_PER_WORKER * max(1, n_workers))
    return max(1, min(n_units, want))


def group_units(sizes: Sequence[int], min_size: int) -> list[range]:
    """Consecutive items grouped greedily until a group holds at least ``min_size`` (the last may hold less)."""
    groups: list[range] = []
    start = total = 0
    for i, size in enumerate(sizes):
        total += size
        if total >= min_size:
            groups.append(range(start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        groups.append(range(start, len(sizes)))
    return groups


def sentences_digest(sentences: Sequence[Sequence[int]]) -> str:
    """SHA-256 of token-id sequences (lengths and ids)."""
    h = hashlib.sha256()
    h.update(np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences)).tobytes())
    chunk: list[int] = []
    for s in sentences:
        chunk.extend(int(t) for t in s)
        if len(chunk) > 1 << 20:
            h.update(np.asarray(chunk, dtype=np.int64).tobytes())
            chunk = []
    h.update(np.asarray(chunk, dtype=np.int64).tobytes())
    return h.hexdigest()


@torch.no_grad()
def model_fingerprint(adapter: LMAdapter) -> str:
    """SHA-256 of the model's shape and the FFN keys and values of its first and last layers."""
    h = hashlib.sha256()
    h.update(repr((type(adapter).__name__, adapter.n_layers, adapter.d_model, adapter.d_ff, adapter.vocab_size)).encode())
    for layer in sorted({0, adapter.n_layers - 1}):
        for w in (adapter.ffn_keys(layer), adapter.ffn_values(layer)):
            h.update(w.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def config_hash(config: dict) -> str:
    """SHA-256 of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


# ----- manifest ----------------------------------------------------------------------------------------------


def shard_file(run_dir: Path, shard: int) -> Path:
    return Path(run_dir) / f"shard-{shard:05d}.pt"


class Manifest:
    """``RUN_DIR/manifest.json``: config, fingerprints, plan and per-shard status, read and written under a lock."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / MANIFEST

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock on the manifest (between processes, also on NFS through ``fcntl``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): one writer per run folder
            yield
            return
        with open(self.dir / (MANIFEST + ".lock"), "a+") as f:
            fcntl.lockf(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(f, fcntl.LOCK_UN)

    def read(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise AdapterError(f"manifest {self.path} is unreadable ({type(err).__name__}); "
                               f"delete {self.dir} to start over") from None
        if data.get("format") != FORMAT:
            raise AdapterError(f"{self.path} is not a scan manifest of this version; delete {self.dir} to start over")
        return data

    def write(self, data: dict) -> None:
        from fflayers.io import write_json

        shards = data["shards"]
        left = [s for s in shards if s["status"] != "done"]
        data["left"] = {"shards": len(left), "sentences": sum(s["sentences"] for s in left)}
        data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(self.path, data)

    def open(self, kind: str, config: dict, chash: str, make_plan: Callable[[], dict]) -> dict:
        """The manifest of this configuration: the stored one (refused when its config differs) or a new one."""
        with self.locked():
            data = self.read()
            if data is not None:
                if data["config_hash"] != chash:
                    diff = sorted(k for k in set(config) | set(data["config"])
                                  if json.dumps(config.get(k), default=str) != json.dumps(data["config"].get(k), default=str))
                    raise AdapterError(
                        f"run folder {self.dir} holds a {data['kind']} run of another configuration "
                        f"(differs in: {', '.join(diff) or 'model or data'}); rerun with the same settings, "
                        f"or delete {self.dir} to start over")
                return data
            plan = make_plan()
            data = {"format": FORMAT, "kind": kind, "config": config, "config_hash": chash, "plan": plan,
                    "shards": [{"shard": i, "units": [u0, u1], "sentences": n, "status": "pending"}
                               for i, ((u0, u1), n) in enumerate(zip(plan["shards"], plan["shard_sentences"], strict=True))]}
            self.write(data)
            return data

    def update(self, shard: int, **fields: Any) -> None:
        with self.locked():
            data = self.read()
            if data is None:
                raise AdapterError(f"manifest {self.path} disappeared during the run; rerun with --resume")
            data["shards"][shard].update(fields)
            self.write(data)


# ----- running -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workers:
    """This process among all workers: job ``job`` of ``jobs`` (job arrays), rank ``rank`` of ``world`` (torchrun)."""

    job: int = 0
    jobs: int = 1
    rank: int = 0
    world: int = 1

    @property
    def count(self) -> int:
        return self.jobs * self.world


@dataclass
class ScanResult:
    """The merged result (on rank 0; None elsewhere) and what was done."""

    result: Any
    plan: dict
    job_shards: list[int]
    computed: list[int] = field(default_factory=list)  # shards computed by this rank in this run
    reused: int = 0  # finished shards loaded from the run folder (rank 0)
    computed_all: int = 0  # shards computed by all ranks of this job in this run (rank 0)


def make_plan(task: ScanTask, n_sentences: int, workers: int, shard_sentences: int = SHARD_SENTENCES) -> dict:
    n_shards = choose_n_shards(task.n_units, n_sentences, workers, shard_sentences)
    shards = [shard_range(task.n_units, s, n_shards) for s in range(n_shards)]
    return {"n_units": task.n_units, "n_shards": n_shards, "workers": workers, "n_sentences": n_sentences,
            "shards": [[r.start, r.stop] for r in shards],
            "shard_sentences": [sum(task.unit_sentences(u) for u in r) for r in shards]}


def _check_plan(task: ScanTask, plan: dict) -> None:
    if plan["n_units"] != task.n_units:
        raise AdapterError(f"the stored plan has {plan['n_units']} units, this run {task.n_units}; "
                           "the configuration changed: delete the run folder to start over")


def _save_shard(run_dir: Path, chash: str, shard: int, state: Any) -> None:
    from fflayers.io import atomic_write

    with atomic_write(shard_file(run_dir, shard), "wb") as f:
        torch.save({"config_hash": chash, "shard": shard, "state": state}, f)


def _load_shard(run_dir: Path, chash: str, shard: int) -> Any:
    path = shard_file(run_dir, shard)
    try:
        saved = torch_load_restricted(path)
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise AdapterError(f"shard file {path} is unreadable ({type(err).__name__}); delete it and rerun with --resume") from None
    if saved.get("config_hash") != chash or saved.get("shard") != shard:
        raise AdapterError(f"shard file {path} belongs to another run; delete the run folder to start over")
    return saved["state"]


def _done(run_dir: Path, data: dict, shard: int) -> bool:
    return data["shards"][shard]["status"] == "done" and shard_file(run_dir, shard).is_file()


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
) -> ScanResult:
    """Run the shards of this worker and merge (see the module docstring); call on every rank.

    ``make_task(batch_tokens)`` builds the task; ``batch_tokens`` is this rank's choice (the smallest over the
    ranks is used, or the one stored in the manifest). ``config`` (JSON-able, with the model and data
    fingerprints) identifies the run. Returns the merged result of the job's shards on rank 0.
    """
    from tqdm.auto import tqdm

    info = dist_info()
    workers = workers or Workers(rank=info.rank, world=info.world_size)
    chash = config_hash(config)
    batch_tokens = min(gather_objects(int(batch_tokens)))
    data = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        reply: tuple[str, Any] = ("ok", None)
        if info.is_main:
            try:
                def plan_now() -> dict:
                    return {**make_plan(make_task(batch_tokens), n_sentences, workers.count, shard_sentences),
                            "batch_tokens": batch_tokens}

                reply = ("ok", Manifest(run_dir).open(config.get("kind", desc), config, chash, plan_now))
            except AdapterError as err:
                reply = ("error", str(err))
        reply = broadcast_from_main(reply)
        if reply[0] == "error":
            raise AdapterError(reply[1])
        data = reply[1]
        plan = data["plan"]
        task = make_task(int(plan["batch_tokens"]))
        _check_plan(task, plan)
    else:
        task = make_task(batch_tokens)
        plan = {**make_plan(task, n_sentences, workers.count, shard_sentences), "batch_tokens": batch_tokens}

    n_shards = plan["n_shards"]
    job_workers = range(workers.job * workers.world, (workers.job + 1) * workers.world)
    job_shards = sorted({s for w in job_workers for s in shard_range(n_shards, w, workers.count)})
    if workers.jobs == 1:  # the whole run is this job: every shard
        job_shards = list(range(n_shards))
    done = [s for s in job_shards if data is not None and _done(run_dir, data, s)]
    pending = [s for s in job_shards if s not in set(done)]
    mine = [pending[i] for i in shard_range(len(pending), workers.rank, workers.world)]
    barrier()  # every rank has read the manifest before anyone changes it

    manifest = Manifest(run_dir) if run_dir is not None else None
    total = sum(plan["shard_sentences"][s] for s in mine)
    bar = tqdm(total=total, disable=not progress, unit="sent", desc=desc)
    acc = None
    try:
        for s in mine:
            u0, u1 = plan["shards"][s]
            t0 = time.time()
            if manifest is not None:
                manifest.update(s, status="running", worker=f"job {workers.job}/{workers.jobs} rank {workers.rank}/{workers.world}",
                                host=socket.gethostname(), pid=os.getpid())
            part = task.run_units(range(u0, u1), bar.update)
            if manifest is not None:
                _save_shard(run_dir, chash, s, task.to_state(part))
                manifest.update(s, status="done", seconds=round(time.time() - t0, 3))
            acc = part if acc is None else task.merge([acc, part])
    finally:
        bar.close()

    gathered = gather_to_main((None if acc is None else task.to_state(acc), len(mine)))
    out = ScanResult(None, plan, job_shards, computed=list(mine))
    if gathered is None:
        return out
    parts = [task.from_state(p) for p, _ in gathered if p is not None]
    out.computed_all = sum(n for _, n in gathered)
    for s in done:  # finished in an earlier run: loaded on rank 0
        parts.append(task.from_state(_load_shard(run_dir, chash, s)))
    out.reused = len(done)
    out.result = task.merge(parts) if parts else None  # None: a job without shards (more jobs than shards)
    return out


def auto_batch_tokens(adapter: LMAdapter, default: int = 4096, share: float = 0.5) -> int:
    """Padded tokens per batch: on CUDA from the free device memory (``share`` of it, at an estimated
    ``4 * (32 d_model + 8 d_ff)`` bytes of activations per token; a power of two in 1024 .. 2**20); ``default``
    on other devices."""
    if adapter.device.type != "cuda":
        return default
    free, _total = torch.cuda.mem_get_info(adapter.device)
    per_token = 4 * (32 * adapter.d_model + 8 * adapter.d_ff)
    tokens = max(1, int(share * free / per_token))
    return int(min(1 << 20, max(1024, 1 << (tokens.bit_length() - 1))))
