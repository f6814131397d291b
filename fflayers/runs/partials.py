"""Partial results of job arrays (``--shard I/N``) and their merge, for any analysis.

Job ``I`` of ``N`` writes ``OUTPUT.shard-I-of-N.pt`` (:func:`partial_path`): a header (the analysis
``kind``, the resume key and its hash, the job, the number of shards and the shards it covers, plus anything
the analysis adds), its merged partial state and ``extra`` (a dict of dicts, such as the texts a top-k refers
to). :func:`merge_partials` checks that the ``N`` partials come from one run and cover every shard exactly
once, and merges their states with the merge registered for their kind (:func:`register_merge`), so one
command can merge the partials of any analysis whose module registered its merge (and, for that command,
the writer of its output: :func:`merged_writer`).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fflayers.core import InputError, RunStateError
from fflayers.runs.manifest import config_differences
from fflayers.safe_pickle import UnsafePickleError, torch_load_restricted

__all__ = ["PARTIAL_FORMAT", "MergedPartials", "partial_path", "partial_header", "write_partial",
           "read_partial", "find_partials", "register_merge", "merge_function", "merged_writer",
           "check_partials", "merge_partials"]

PARTIAL_FORMAT = "fflayers-partial/1"
HEADER_KEYS = ("kind", "config", "config_hash", "job", "jobs", "n_shards", "shards")

#: kind -> merge of a list of states into one state (or ``"module:function"``, imported on first use)
MERGES: dict[str, Callable[[list[Any]], Any] | str] = {}
#: kind -> ``write(output, merged)``: the run's output from its merged partials (or ``"module:function"``)
WRITERS: dict[str, Callable[[Path, MergedPartials], None] | str] = {}


def register_merge(kind: str, merge: Callable[[list[Any]], Any] | str,
                   write: Callable[[Path, MergedPartials], None] | str | None = None) -> None:
    """Register how states of ``kind`` merge: ``merge(states) -> state``, associative and independent of the
    order of the states, or the ``"module:function"`` that is; ``write(output, merged)``, when given, writes
    the output of a run from the :class:`MergedPartials` of its jobs (``fflayers merge``)."""
    MERGES[kind] = merge
    if write is not None:
        WRITERS[kind] = write


def _registered(registry: dict[str, Any], kind: str, what: str) -> Callable:
    """``registry[kind]``, imported when it is a ``"module:function"``; one-line InputError when missing."""
    found = registry.get(kind)
    if found is None:
        known = ", ".join(sorted(registry)) or "none"
        raise InputError(f"no {what} is registered for {kind} partials (registered: {known}); import the "
                         "module of that analysis first")
    if isinstance(found, str):
        module, _, name = found.partition(":")
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise InputError(f"the {what} {registry[kind]} of {kind} cannot be loaded ({err})") from None
        registry[kind] = found
    return found


def merge_function(kind: str) -> Callable[[list[Any]], Any]:
    """The merge registered for ``kind``; one-line :class:`~fflayers.core.InputError` when there is none."""
    return _registered(MERGES, kind, "merge")


def merged_writer(kind: str) -> Callable[[Path, MergedPartials], None]:
    """The output writer registered for ``kind`` (:func:`register_merge`); one-line
    :class:`~fflayers.core.InputError` when there is none."""
    return _registered(WRITERS, kind, "output writer")


def partial_path(output: str | os.PathLike, job: int, jobs: int) -> Path:
    """``OUTPUT.shard-JOB-of-JOBS.pt``."""
    return Path(f"{output}.shard-{job}-of-{jobs}.pt")


def partial_header(run: Any, **more: Any) -> dict:
    """The header of a job's partial from its :class:`~fflayers.runs.RunResult`, with ``more`` added."""
    return {"kind": run.kind, "config": run.config, "config_hash": run.config_hash,
            "job": run.workers.job, "jobs": run.workers.jobs, "n_shards": run.plan["n_shards"],
            "shards": list(run.job_shards), **more}


def write_partial(path: str | os.PathLike, header: dict, state: Any, extra: dict | None = None) -> None:
    """Write a job's partial (atomically); ``header`` holds at least :data:`HEADER_KEYS`."""
    from fflayers.io import atomic_write

    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise ValueError(f"a partial's header needs {', '.join(missing)}")
    with atomic_write(path, "wb") as f:
        torch.save({**header, "format": PARTIAL_FORMAT, "state": state, "extra": extra or {}}, f)


def read_partial(path: str | os.PathLike) -> dict:
    """A partial's content; one-line :class:`~fflayers.core.InputError` for an unreadable or foreign file."""
    try:
        data = torch_load_restricted(path)
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise InputError(f"partial {path} is unreadable ({type(err).__name__}); rerun its job") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != PARTIAL_FORMAT:
        raise InputError(f"{path} is not a partial of this version (format {found or 'unknown'!s}, "
                         f"expected {PARTIAL_FORMAT}); pass the OUTPUT.shard-I-of-N.pt files of one run, "
                         "or rerun its jobs")
    return data


def find_partials(output: str | os.PathLike) -> list[Path]:
    """The ``OUTPUT.shard-I-of-N.pt`` files beside ``output``, sorted by name."""
    output = Path(output)
    pattern = re.compile(re.escape(output.name) + r"\.shard-(\d+)-of-(\d+)\.pt$")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if pattern.match(p.name))


@dataclass
class MergedPartials:
    """The merge of one run's partials: the first header, the merged state, the union of the extras."""

    header: dict
    state: Any
    extra: dict = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)


def check_partials(parts: list[tuple[Path, dict]]) -> None:
    """Refuse (one line) partials of different runs, or a set that does not cover jobs and shards once."""
    first_path, first = parts[0]
    for path, part in parts[1:]:
        if part["kind"] != first["kind"]:
            raise RunStateError(f"partials {first_path.name} and {path.name} are of different analyses "
                                f"({first['kind']}, {part['kind']}); merge the partials of one run only")
        if part["config_hash"] != first["config_hash"]:
            diff = config_differences(part["config"], first["config"])
            keys = ", ".join(k for k, _, _ in diff) or "model or data"
            values = "".join(f"{k} is {a} in {path.name}, {b} in {first_path.name}; " for k, a, b in diff)
            raise RunStateError(f"partials {first_path.name} and {path.name} come from different "
                                f"configurations (differ in: {keys}); {values}merge partials of one run only")
        if part["jobs"] != first["jobs"]:
            raise RunStateError(f"partials {first_path.name} and {path.name} split the run into "
                                f"{first['jobs']} and {part['jobs']} jobs; merge the partials of one job "
                                "array")
    jobs = first["jobs"]
    seen = sorted(part["job"] for _, part in parts)
    if seen != list(range(jobs)):
        missing = sorted(set(range(jobs)) - set(seen))
        twice = sorted({j for j in seen if seen.count(j) > 1})
        raise InputError(f"the partials of a {jobs}-job run must be jobs 0..{jobs - 1} once each "
                         f"(missing: {missing or 'none'}, repeated: {twice or 'none'}); "
                         "rerun the missing jobs")
    shards = sorted(s for _, part in parts for s in part["shards"])
    if shards != list(range(first["n_shards"])):
        raise RunStateError(f"the partials cover shards {shards[:10]}..., not 0..{first['n_shards'] - 1} "
                            "once each; rerun the jobs of one plan (same run folder)")


def merge_partials(paths: Sequence[str | os.PathLike]) -> MergedPartials:
    """The merge of the partials of one run (see the module docstring); refuses mixed or incomplete sets."""
    if not paths:
        raise InputError("no partials to merge; pass the OUTPUT.shard-I-of-N.pt files of every job")
    parts = [(Path(p), read_partial(p)) for p in paths]
    check_partials(parts)
    first = parts[0][1]
    merge = merge_function(first["kind"])
    states = [part["state"] for _, part in parts if part["state"] is not None]
    extra: dict = {}
    for _, part in parts:
        for key, value in part["extra"].items():
            if isinstance(value, dict):
                extra.setdefault(key, {}).update(value)
            else:
                extra.setdefault(key, value)
    header = {k: v for k, v in first.items() if k not in ("state", "extra", "format")}
    return MergedPartials(header, merge(states) if states else None, extra, [p for p, _ in parts])
