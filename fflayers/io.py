"""Output files: atomic writes (temp file + rename), table formats, run metadata."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fflayers.backends.base import AdapterError


def check_writable(path: str | Path) -> Path:
    """Fail early, in one line, when ``path`` cannot be written (missing, read-only or special folder).

    The test is real: a temporary file is created in the folder and removed (permission bits say nothing for
    root, and pseudo file systems such as ``/proc`` refuse new files whatever the bits say).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise AdapterError(f"output folder {parent} does not exist; create it or choose another output path")
    if path.is_dir():
        raise AdapterError(f"output path {path} is a folder; give a file name")
    check_folder_writable(parent)
    return path


def check_folder_writable(folder: str | Path) -> None:
    """One-line :class:`AdapterError` unless a file can be created in the existing ``folder``."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fflayers-write-test.", suffix=".tmp")
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise AdapterError(f"cannot write in folder {folder} ({reason}); choose another output path") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success rename it over ``path``, on error delete it.

    A reader never sees a half-written file, and an interrupted run leaves the old file (if any) intact.
    """
    path = check_writable(path)
    binary = "b" in mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, mode, **({} if binary else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f)


def write_jsonl(path: str | Path, rows) -> None:
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_pickle(path: str | Path, obj: Any) -> None:
    with atomic_write(path, "wb") as f:
        pickle.dump(obj, f)


def write_table(path: str | Path, df) -> None:
    """Write a pandas DataFrame by extension: .parquet, .tsv, .csv, .jsonl; anything else (.pkl) pickles it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        with atomic_write(path, "wb") as f:
            df.to_parquet(f, index=False)
    elif suffix in (".tsv", ".csv"):
        with atomic_write(path) as f:
            df.to_csv(f, sep="\t" if suffix == ".tsv" else ",", index=False)
    elif suffix == ".jsonl":
        with atomic_write(path) as f:
            df.to_json(f, orient="records", lines=True)
    else:
        write_pickle(path, df)


def file_sha256(path: str | Path, limit: int | None = None) -> str:
    """SHA-256 of a file (of its first ``limit`` bytes when given)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while chunk := f.read(1 << 20 if remaining is None else min(1 << 20, remaining)):
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return h.hexdigest()


def run_metadata(config: dict[str, Any], inputs: dict[str, str | Path] | None = None) -> dict[str, Any]:
    """Config, library versions and input-file hashes, to store next to results."""
    from importlib import metadata

    import torch

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()}
    # distribution metadata, not imports: importing fairseq reconfigures the root logger (DEBUG level)
    for name, dist in (("fairseq", "fairseq-fixed"), ("transformers", "transformers"), ("numpy", "numpy"),
                       ("pandas", "pandas")):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[name] = None
    from fflayers import __version__

    versions["fflayers"] = __version__
    hashes = {k: file_sha256(v) for k, v in (inputs or {}).items() if Path(v).is_file()}
    return {"config": config, "versions": versions, "inputs": hashes}
