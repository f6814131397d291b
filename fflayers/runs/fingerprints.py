"""What identifies a run: fingerprints of the model and the data, content hashes of input files, the config.

A resume is allowed only when all of them match the run folder's, so they must change whenever the result
would: the model's shape and weights, the token ids read, the *content* of input files (never their paths:
a moved file is the same input, a file edited in place is not), and every option of the analysis.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from fflayers.backends.base import LMAdapter

__all__ = ["model_fingerprint", "data_digest", "file_digest", "config_dict", "config_hash"]


@torch.no_grad()
def model_fingerprint(adapter: LMAdapter) -> str:
    """SHA-256 of the model's class and sizes and of the FFN keys and values of its first and last layers."""
    h = hashlib.sha256()
    sizes = (type(adapter).__name__, adapter.n_layers, adapter.d_model, adapter.d_ff, adapter.vocab_size)
    h.update(repr(sizes).encode())
    for layer in sorted({0, adapter.n_layers - 1}):
        for w in (adapter.ffn_keys(layer), adapter.ffn_values(layer)):
            h.update(w.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def data_digest(sequences: Sequence[Sequence[int]]) -> str:
    """SHA-256 of token-id sequences: their lengths, then their ids (as int64)."""
    h = hashlib.sha256()
    h.update(np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences)).tobytes())
    chunk: list[int] = []
    for s in sequences:
        chunk.extend(int(t) for t in s)
        if len(chunk) > 1 << 20:
            h.update(np.asarray(chunk, dtype=np.int64).tobytes())
            chunk = []
    h.update(np.asarray(chunk, dtype=np.int64).tobytes())
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content (a facts file, paragraphs, a map): the same for a copy, new for an edit."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def config_dict(config: Any) -> dict:
    """A config as plain JSON data: a dataclass through :func:`dataclasses.asdict`, or a mapping; tuples
    become lists and values JSON cannot hold (paths, dtypes) their ``str``."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"a run's config is a dataclass instance or a mapping, not {type(config).__name__}")
    return json.loads(json.dumps(dict(config), default=str))


def config_hash(config: Any) -> str:
    """SHA-256 of a config (see :func:`config_dict`); the order of its keys does not matter."""
    return hashlib.sha256(json.dumps(config_dict(config), sort_keys=True, default=str).encode()).hexdigest()
