"""Token search over FF values (``fflayers explore``'s search): which values have a token among their top
tokens in embedding space.

The values' top-k tokens come from the embedding-space export (``fflayers embedding export``, its value rows)
or, without one, are computed once from the model and cached as parquet. A search is a binary search in the
table sorted by token, so it costs the same whatever the model's size.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.embedding_space.projections import TOKEN_COLUMNS, iter_neuron_tokens
from fflayers.embedding_space.vocabulary import Embedding, embedding_matrix

__all__ = ["ValueIndex"]

#: top tokens per value kept when the server computes them itself
DEFAULT_K = 20
#: top tokens per value shown beside a search result
SHOWN = 8


class ValueIndex:
    """Top tokens of every value, from ``values_file`` (an export) or computed (cached at ``cache_path``)."""

    def __init__(self, adapter: LMAdapter, values_file: str | os.PathLike | None = None,
                 cache_path: str | os.PathLike | None = None, k: int = DEFAULT_K) -> None:
        self.adapter = adapter
        self.values_file = None if values_file is None else Path(values_file)
        if self.values_file is not None and not self.values_file.is_file():
            raise InputError(f"--values {self.values_file} does not exist; pass the parquet file of "
                             "`fflayers embedding export`")
        self.cache_path = None if cache_path is None else Path(cache_path)
        self.k = k
        self._embedding: Embedding | None = None
        self._lock = threading.Lock()
        self._ready = False

    @property
    def embedding(self) -> Embedding:
        """The output embedding the values are read with (computed once)."""
        if self._embedding is None:
            self._embedding = embedding_matrix(self.adapter, "output")
        return self._embedding

    # ----- building ----------------------------------------------------------------------------------------
    def _table(self) -> pd.DataFrame:
        if self.values_file is not None:
            return self._read_export(self.values_file)
        if self.cache_path is not None and self.cache_path.is_file():
            return pd.read_parquet(self.cache_path)
        a = self.adapter
        frames = iter_neuron_tokens(a, self.embedding, list(range(a.n_layers)), sides=("value",), k=self.k)
        table = pd.concat(list(frames), ignore_index=True)[TOKEN_COLUMNS]
        if self.cache_path is not None:
            from fflayers.io import write_table

            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_table(self.cache_path, table)
        return table

    def _read_export(self, path: Path) -> pd.DataFrame:
        try:
            table = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several unrelated types for a file that is not parquet
            raise InputError(f"--values {path} is not a parquet file ({type(err).__name__}); pass the output "
                             "of `fflayers embedding export --output_file values.parquet`") from None
        missing = set(TOKEN_COLUMNS) - set(table.columns)
        if missing:
            raise InputError(f"--values {path} lacks the columns {', '.join(sorted(missing))}; pass the "
                             "output "
                             "of `fflayers embedding export`")
        table = table[table["side"] == "value"]
        a = self.adapter
        if table.empty:
            raise InputError(f"--values {path} has no value rows; export with --sides value (the default "
                             "exports keys and values)")
        bad = ((table["layer"] >= a.n_layers) | (table["neuron"] >= a.d_ff)
               | (table["token_id"] >= a.vocab_size))
        if bad.any():
            raise InputError(f"--values {path} is the export of another model (layer, neuron or token ids "
                             "out "
                             "of this model's range); export it from this model")
        return table

    def _build(self) -> None:
        table = self._table().sort_values(["layer", "neuron", "rank"], kind="stable")
        keys = table["layer"].to_numpy(np.int64) * self.adapter.d_ff + table["neuron"].to_numpy(np.int64)
        uniq, first = np.unique(keys, return_index=True)
        self._value_keys = uniq
        # the first SHOWN tokens of each value, -1 padded
        shown = np.full((len(uniq), SHOWN), -1, dtype=np.int64)
        row_of = np.searchsorted(uniq, keys)
        rank_in = np.arange(len(keys)) - first[row_of]
        keep = rank_in < SHOWN
        shown[row_of[keep], rank_in[keep]] = table["token_id"].to_numpy(np.int64)[keep]
        self._shown = shown
        order = np.lexsort((-table["score"].to_numpy(), table["rank"].to_numpy(),
                            table["token_id"].to_numpy()))
        self._tok = table["token_id"].to_numpy(np.int64)[order]
        self._layer = table["layer"].to_numpy(np.int64)[order]
        self._neuron = table["neuron"].to_numpy(np.int64)[order]
        self._rank = table["rank"].to_numpy(np.int64)[order]
        self._score = table["score"].to_numpy(np.float64)[order]
        self._row = row_of[order]
        self._ready = True

    def ensure(self) -> None:
        """Read or compute the table now (otherwise the first search does)."""
        with self._lock:
            if not self._ready:
                self._build()

    # ----- searching ---------------------------------------------------------------------------------------
    def search(self, token_id: int, limit: int) -> list[dict]:
        """Values whose top tokens contain ``token_id``: by the token's rank there, then by its score."""
        self.ensure()
        lo, hi = np.searchsorted(self._tok, [token_id, token_id + 1])
        hi = min(hi, lo + limit)
        tokens = self.adapter.vocab.tokens
        out = []
        for j in range(lo, hi):
            shown = [tokens[t] for t in self._shown[self._row[j]] if t >= 0]
            out.append({"layer": int(self._layer[j]), "dim": int(self._neuron[j]), "rank": int(self._rank[j]),
                        "score": float(self._score[j]), "top_tokens": shown})
        return out
