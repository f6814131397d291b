"""Keys looked up by (layer, dim) in the outputs of earlier runs: trigger examples (a ``fflayers memories
textual`` folder), the key-value agreement table and knowledge-neuron results (what ``fflayers explore``
shows on a value's page). Each source is optional; files are read once, on first use."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pandas as pd

from fflayers.core import InputError
from fflayers.memories.textual import parse_line

__all__ = ["MemoryIndex"]


class MemoryIndex:
    """Trigger examples of ``triggers_dir`` (one ``DIM_LAYER.txt`` per key), rows of an ``agreement`` TSV
    and the facts of a knowledge-neuron ``results.json`` (``neurons``), looked up by (layer, dim)."""

    def __init__(self, triggers_dir: str | os.PathLike | None = None,
                 agreement: str | os.PathLike | None = None, neurons: str | os.PathLike | None = None,
                 max_examples: int = 50) -> None:
        self.triggers_dir = None if triggers_dir is None else Path(triggers_dir)
        if self.triggers_dir is not None and not self.triggers_dir.is_dir():
            raise InputError(f"--memories {self.triggers_dir} is not a folder; pass the output folder of "
                             "`fflayers memories textual` (one DIM_LAYER.txt per key)")
        if self.triggers_dir is not None and not any(self.triggers_dir.glob("*_*.txt")):
            raise InputError(f"--memories {self.triggers_dir} holds no DIM_LAYER.txt files; pass the output "
                             "folder of `fflayers memories textual`")
        self.max_examples = max_examples
        self._agreement = None if agreement is None else self._read_agreement(Path(agreement))
        self._neurons = None if neurons is None else self._read_neurons(Path(neurons))
        self._all: pd.DataFrame | None = None
        self._lock = threading.Lock()

    @property
    def has_triggers(self) -> bool:
        return self.triggers_dir is not None

    @property
    def has_agreement(self) -> bool:
        return self._agreement is not None

    @property
    def has_neurons(self) -> bool:
        return self._neurons is not None

    # ----- reading -----------------------------------------------------------------------------------------
    @staticmethod
    def _read_agreement(path: Path) -> dict[tuple[int, int], dict]:
        if not path.is_file():
            raise InputError(f"--agreement {path} does not exist; pass the .tsv of `fflayers memories "
                             "agreement`")
        try:
            table = pd.read_csv(path, sep="\t")
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(f"--agreement {path} is not a TSV table ({err})") from None
        if not {"layer", "W2_dim"} <= set(table.columns):
            raise InputError(f"--agreement {path} lacks the columns layer and W2_dim; pass the .tsv of "
                             "`fflayers memories agreement`")
        rows = table.to_dict("records")
        return {(int(r["layer"]), int(r["W2_dim"])): {k: _plain(v) for k, v in r.items()} for r in rows}

    @staticmethod
    def _read_neurons(path: Path) -> dict[tuple[int, int], list[dict]]:
        if not path.is_file():
            raise InputError(f"--neurons {path} does not exist; pass the results.json of `fflayers neurons`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            facts = data["facts"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise InputError(f"--neurons {path} is not a results.json of `fflayers neurons` (no 'facts' "
                             "list)") from None
        out: dict[tuple[int, int], list[dict]] = {}
        for fact in facts:
            for layer, dim in fact.get("neurons", []):
                out.setdefault((int(layer), int(dim)), []).append(
                    {k: fact.get(k) for k in ("uuid", "relation", "answer")})
        return out

    def _read_key(self, path: Path, layer: int, dim: int) -> list[dict]:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise InputError(f"{path} is not UTF-8 text; regenerate it with `fflayers memories "
                             "textual`") from None
        rows = []
        for line in lines:
            if line.strip():
                value, prefix, target = parse_line(line)
                rows.append({"layer": layer, "dim": dim, "activation": value, "prefix": prefix,
                             "target": target})
        return rows

    # ----- lookups -----------------------------------------------------------------------------------------
    def triggers(self, layer: int, dim: int) -> list[dict] | None:
        """The key's trigger examples (activation, prefix, target), best first; None without ``--memories``;
        [] for a key that has no file."""
        if self.triggers_dir is None:
            return None
        path = self.triggers_dir / f"{dim}_{layer}.txt"
        if not path.is_file():
            return []
        rows = self._read_key(path, layer, dim)[: self.max_examples]
        return [{k: r[k] for k in ("activation", "prefix", "target")} for r in rows]

    def agreement(self, layer: int, dim: int) -> dict | None:
        return None if self._agreement is None else self._agreement.get((layer, dim))

    def neuron_facts(self, layer: int, dim: int) -> list[dict] | None:
        return None if self._neurons is None else self._neurons.get((layer, dim), [])

    def all_triggers(self) -> pd.DataFrame:
        """Every trigger example of the folder (read once)."""
        with self._lock:
            if self._all is None:
                frames = []
                for path in sorted(self.triggers_dir.glob("*_*.txt")):
                    dim, _, layer = path.stem.partition("_")
                    if dim.isdigit() and layer.isdigit():
                        frames.append(self._read_key(path, int(layer), int(dim)))
                rows = [r for f in frames for r in f]
                self._all = pd.DataFrame(rows, columns=["layer", "dim", "activation", "prefix", "target"])
                self._all["text"] = (self._all["prefix"] + " " + self._all["target"]).str.lower()
            return self._all

    def search(self, text: str, limit: int) -> list[dict]:
        """Trigger examples whose prefix and target contain ``text`` (case-insensitive), by activation."""
        table = self.all_triggers()
        hits = table[table["text"].str.contains(text.lower(), regex=False)]
        hits = hits.sort_values("activation", ascending=False, kind="stable").head(limit)
        return [{k: _plain(r[k]) for k in ("layer", "dim", "activation", "prefix", "target")}
                for r in hits.to_dict("records")]


def _plain(v):
    """A JSON-friendly scalar (numpy scalars to Python, NaN to None)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v
