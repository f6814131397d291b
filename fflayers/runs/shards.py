"""Shard files: ``RUN_DIR/shard-NNNNN.pt``, the saved partial state of one finished shard.

A shard file is written atomically (temporary file, then rename) and holds the config hash, the shard
number and the state; the manifest records its size and SHA-256. It is read with
:func:`fflayers.safe_pickle.torch_load_restricted`, so a planted file cannot run code
(:class:`~fflayers.safe_pickle.UnsafePickleError`); a truncated, corrupt or foreign file is a
:class:`ShardFileError`, which the engine answers by computing the shard again.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from fflayers.core import RunStateError
from fflayers.safe_pickle import UnsafePickleError, torch_load_restricted

__all__ = ["ShardFileError", "shard_file", "save_shard", "load_shard", "shard_file_intact"]


class ShardFileError(RunStateError):
    """A shard file that cannot be used: missing, truncated, corrupt, of another run or another hash."""


def shard_file(run_dir: str | os.PathLike, shard: int) -> Path:
    """The file of shard ``shard`` in ``run_dir``."""
    return Path(run_dir) / f"shard-{shard:05d}.pt"


def save_shard(run_dir: str | os.PathLike, shard: int, config_hash: str, state: Any) -> dict:
    """Write the state of a finished shard atomically; returns ``{"bytes": size, "sha256": hex digest}``."""
    from fflayers.io import atomic_write

    buf = io.BytesIO()
    torch.save({"config_hash": config_hash, "shard": shard, "state": state}, buf)
    payload = buf.getvalue()
    with atomic_write(shard_file(run_dir, shard), "wb") as f:
        f.write(payload)
    return {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def shard_file_intact(run_dir: str | os.PathLike, shard: int, entry: dict) -> bool:
    """A cheap check of a shard the manifest calls done: its file exists with the recorded size."""
    path = shard_file(run_dir, shard)
    if entry.get("status") != "done" or not path.is_file():
        return False
    return "bytes" not in entry or path.stat().st_size == entry["bytes"]


def load_shard(run_dir: str | os.PathLike, shard: int, config_hash: str, sha256: str | None = None) -> Any:
    """The state saved for ``shard``; checks the file's SHA-256 (when given), config hash and shard number.

    Raises :class:`ShardFileError` for a file that cannot be used, and
    :class:`~fflayers.safe_pickle.UnsafePickleError` for one naming code outside the allow-list.
    """
    path = shard_file(run_dir, shard)
    try:
        payload = path.read_bytes()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ShardFileError(f"shard file {path} is unreadable ({reason})") from None
    if sha256 is not None and hashlib.sha256(payload).hexdigest() != sha256:
        raise ShardFileError(f"shard file {path} does not match its hash in the manifest (truncated or "
                             "changed)")
    try:
        saved = torch_load_restricted(io.BytesIO(payload))  # type: ignore[arg-type]  # torch.load reads files
    except UnsafePickleError:
        raise
    except Exception as err:  # noqa: BLE001 - any undecodable file is answered alike
        raise ShardFileError(f"shard file {path} is unreadable ({type(err).__name__})") from None
    if not isinstance(saved, dict) or saved.get("config_hash") != config_hash or saved.get("shard") != shard:
        raise ShardFileError(f"shard file {path} belongs to another run or shard")
    return saved["state"]
