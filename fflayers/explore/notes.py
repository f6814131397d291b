"""Names and notes a user gives to values, kept in SQLite (they survive restarts), exportable as CSV."""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import threading
import time
from pathlib import Path

from fflayers.core import InputError

__all__ = ["Notes", "default_notes_path"]

_SCHEMA = """CREATE TABLE IF NOT EXISTS notes (
    fingerprint TEXT NOT NULL, layer INTEGER NOT NULL, dim INTEGER NOT NULL,
    name TEXT NOT NULL, note TEXT NOT NULL, updated TEXT NOT NULL,
    PRIMARY KEY (fingerprint, layer, dim))"""


def default_notes_path() -> Path:
    """``$XDG_CACHE_HOME/fflayers/explorer.sqlite`` (``~/.cache`` by default)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fflayers" / "explorer.sqlite"


class Notes:
    """The notes of one SQLite file; every method is safe to call from several threads."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            with self._db:
                self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise InputError(f"cannot open the notes file {self.path} ({err}); pass --notes with a writable "
                             "path") from None
        self._lock = threading.Lock()

    def put(self, fingerprint: str, layer: int, dim: int, name: str, note: str) -> None:
        """Store (or replace) the name and note of value ``dim`` of ``layer``."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO notes VALUES (?, ?, ?, ?, ?, ?)",
                             (fingerprint, layer, dim, name, note, stamp))

    def get(self, fingerprint: str, layer: int, dim: int) -> dict | None:
        """``{"name", "note", "updated"}`` or None."""
        with self._lock:
            row = self._db.execute("SELECT name, note, updated FROM notes WHERE fingerprint = ? "
                                   "AND layer = ? AND dim = ?", (fingerprint, layer, dim)).fetchone()
        return None if row is None else {"name": row[0], "note": row[1], "updated": row[2]}

    def to_csv(self, fingerprint: str) -> str:
        """Every note of the model as CSV: ``layer,dim,name,note,updated``."""
        with self._lock:
            rows = self._db.execute("SELECT layer, dim, name, note, updated FROM notes WHERE fingerprint = ? "
                                    "ORDER BY layer, dim", (fingerprint,)).fetchall()
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["layer", "dim", "name", "note", "updated"])
        writer.writerows(rows)
        return buf.getvalue()

    def close(self) -> None:
        with self._lock:
            self._db.close()
