"""Output files: atomic writes (temp file + rename), table formats by suffix, run metadata."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import platform
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from fflayers.core import InputError


def check_writable(path: str | Path) -> Path:
    """Fail early, in one line, when ``path`` cannot be written (missing, read-only or special folder).

    The test is real: a temporary file is created in the folder and removed (permission bits say nothing for
    root, and pseudo file systems such as ``/proc`` refuse new files whatever the bits say).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output folder {parent} does not exist; create it or choose another output path")
    if path.is_dir():
        raise InputError(f"output path {path} is a folder; give a file name")
    check_folder_writable(parent)
    return path


def check_folder_writable(folder: str | Path) -> None:
    """One-line :class:`~fflayers.core.InputError` unless a file can be created in the existing ``folder``."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fflayers-write-test.", suffix=".tmp")
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise InputError(f"cannot write in folder {folder} ({reason}); "
                           "choose another output path") from None
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


#: The one rule for table files: suffix (lower case) -> format. Every table writer and reader of fflayers
#: and of its commands goes through :func:`write_table` / :func:`read_table`, so they all accept these and
#: only these.
TABLE_FORMATS: dict[str, str] = {".parquet": "parquet", ".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl",
                                 ".pkl": "pickle", ".pickle": "pickle"}
TABLE_SUFFIXES: tuple[str, ...] = tuple(TABLE_FORMATS)


def table_suffix(path: str | Path, flag: str | None = None) -> str:
    """The lower-case suffix of ``path`` when it names a table format (:data:`TABLE_FORMATS`); otherwise a
    one-line :class:`~fflayers.core.InputError` that lists the accepted ones (``flag``: the option to
    name)."""
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_FORMATS:
        name = f"{flag} {path}" if flag else str(path)
        raise InputError(f"{name}: unknown table format {suffix or '(no suffix)'!r}; give a table file "
                         f"ending in {', '.join(TABLE_SUFFIXES)}")
    return suffix


def write_table(path: str | Path, table: Any, chunked: bool = False) -> int:
    """Write a pandas DataFrame in the format of the suffix of ``path`` (:data:`TABLE_FORMATS`); returns its
    row count. ``chunked``: ``table`` is an iterable of DataFrames with the same columns (parquet: streamed
    chunk by chunk; other formats: concatenated first). An unknown suffix is an
    :class:`~fflayers.core.InputError` before anything is written."""
    fmt = TABLE_FORMATS[table_suffix(path)]
    if chunked:
        if fmt == "parquet":
            return _write_parquet_chunks(path, table)
        import pandas as pd

        table = pd.concat(list(table), ignore_index=True)
    if fmt == "parquet":
        with atomic_write(path, "wb") as f:
            table.to_parquet(f, index=False)
    elif fmt in ("tsv", "csv"):
        with atomic_write(path) as f:
            table.to_csv(f, sep="\t" if fmt == "tsv" else ",", index=False)
    elif fmt == "jsonl":
        with atomic_write(path) as f:
            table.to_json(f, orient="records", lines=True)
    else:
        write_pickle(path, table)
    return len(table)


def _write_parquet_chunks(path: str | Path, frames: Iterable[Any]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    with atomic_write(path, "wb") as f:
        writer = None
        for frame in frames:
            batch = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(f, batch.schema)
            writer.write_table(batch)
            rows += len(frame)
        if writer is not None:
            writer.close()
    return rows


def read_table(path: str | Path, trust: bool = False, as_suffix: str | None = None, **options: Any) -> Any:
    """A pandas DataFrame read in the format of the suffix of ``path`` (or of ``as_suffix``, for a file whose
    format is fixed whatever its name). Pickles are read through :func:`fflayers.safe_pickle.load_pickle`
    (DataFrames and arrays only, unless ``trust``); ``options`` go to pandas' text readers (.tsv, .csv)."""
    import pandas as pd

    from fflayers.safe_pickle import load_pickle

    fmt = TABLE_FORMATS[table_suffix(path) if as_suffix is None else as_suffix]
    if not Path(path).is_file():
        raise InputError(f"table {path} does not exist; pass a table written by fflayers")
    if fmt not in ("parquet", "tsv", "csv", "jsonl"):
        return load_pickle(path, trust=trust)
    try:
        if fmt == "parquet":
            return pd.read_parquet(path)
        if fmt in ("tsv", "csv"):
            return pd.read_csv(path, **({"sep": "\t"} if fmt == "tsv" else {}), **options)
        return pd.read_json(path, lines=True)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        first = " ".join(str(err).split())[:160] or type(err).__name__
        raise InputError(f"cannot read {path} as a .{fmt} table ({first}); the file is empty, truncated or "
                         "of another format: pass the table the fflayers command wrote, or rerun that "
                         "command") from None


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
