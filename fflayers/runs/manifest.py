"""``RUN_DIR/manifest.json``: what a run folder holds, read and written under a file lock.

The manifest records the format (:data:`FORMAT`), the analysis ``kind``, the config (the resume key: the
analysis's options and the model and data fingerprints), its hash, the plan (see :mod:`fflayers.runs.plan`)
and one entry per shard: its units, their weight, its status (``pending``, ``running``, ``done``) and, once
done, the size and SHA-256 of its shard file. ``left`` sums the shards not done, for a reader of the file.

:meth:`Manifest.open` refuses, with a one-line :class:`~fflayers.core.RunStateError`, a folder written by
another analysis, in another format, or for another config (naming each option that differs, both values).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fflayers.core import RunStateError

__all__ = ["FORMAT", "MANIFEST", "Manifest", "config_differences"]

MANIFEST = "manifest.json"
FORMAT = "fflayers-run/1"
RESERVED = frozenset({"shard", "units", "status", "bytes", "sha256", "seconds", "worker", "host", "pid"})


def _short(value: Any, width: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def config_differences(here: dict, stored: dict, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, value here, value stored)`` for each key whose values differ, sorted by key; values as short
    text (``(not set)`` for a key one side lacks). A nested config (a dict on both sides) names the option
    inside it: ``search.steps``."""
    missing = "(not set)"
    out = []
    for key in sorted(set(here) | set(stored)):
        a, b = here.get(key, missing), stored.get(key, missing)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append((prefix + key, _short(a), _short(b)))
    return out


class Manifest:
    """The manifest of the run folder ``run_dir`` (created on first use)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / MANIFEST

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive lock on the manifest, between processes (``fcntl``, also on NFS)."""
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
        """The manifest's data, None when there is none yet; refuses an unreadable file or another format."""
        if not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RunStateError(f"manifest {self.path} is unreadable ({type(err).__name__}); "
                                f"delete {self.dir} to start over") from None
        found = data.get("format") if isinstance(data, dict) else None
        if found != FORMAT:
            raise RunStateError(
                f"run folder {self.dir} has a manifest of format {found or 'unknown'!s}, this version reads "
                f"{FORMAT}; finish that run with the version that wrote it, or delete {self.dir} to start "
                "over")
        return data

    def write(self, data: dict) -> None:
        """Write ``data`` atomically, with ``left`` (shards not done and their weight) and the time."""
        from fflayers.io import write_json

        name = data["plan"].get("unit_name", "weight")
        left = [s for s in data["shards"] if s["status"] != "done"]
        data["left"] = {"shards": len(left), name: sum(s[name] for s in left)}
        data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(self.path, data)

    def open(self, kind: str, config: dict, config_hash: str, make_plan: Callable[[], dict]) -> dict:
        """The manifest of this run: the stored one when it matches ``kind`` and ``config``, else a refusal;
        a new one (with the plan ``make_plan()``) when the folder has none."""
        with self.locked():
            data = self.read()
            if data is not None:
                self.check(data, kind, config, config_hash)
                return data
            plan = make_plan()
            name = plan.get("unit_name", "weight")
            if name in RESERVED:
                raise ValueError(f"unit_name {name!r} is a key of the shard entries; choose another")
            pairs = zip(plan["shards"], plan["shard_weights"], strict=True)
            shards = [{"shard": i, "units": [u0, u1], name: w, "status": "pending"}
                      for i, ((u0, u1), w) in enumerate(pairs)]
            data = {"format": FORMAT, "kind": kind, "config": config, "config_hash": config_hash,
                    "plan": plan, "shards": shards}
            self.write(data)
            return data

    def check(self, data: dict, kind: str, config: dict, config_hash: str) -> None:
        """Refuse (one line) stored ``data`` of another analysis or another config."""
        if data.get("kind") != kind:
            raise RunStateError(
                f"run folder {self.dir} holds a run of {data.get('kind')}, not of {kind}; choose another "
                f"output path, or delete {self.dir} to start over")
        if data.get("config_hash") != config_hash:
            diff = config_differences(config, data.get("config") or {})
            keys = ", ".join(key for key, _, _ in diff) or "model or data"
            values = "".join(f"{key} is {a} here, {b} in the run folder; " for key, a, b in diff)
            raise RunStateError(
                f"run folder {self.dir} holds a {kind} run of another configuration (differs in: {keys}); "
                f"{values}rerun with the same settings, or delete {self.dir} to start over")

    def update(self, shard: int, **fields: Any) -> None:
        """Set ``fields`` of shard ``shard`` (its status, timing, file hash) under the lock."""
        with self.locked():
            data = self.read()
            if data is None:
                raise RunStateError(f"manifest {self.path} disappeared during the run; rerun with --resume")
            data["shards"][shard].update(fields)
            self.write(data)
