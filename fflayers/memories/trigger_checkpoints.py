"""Checkpoints of trigger mining (:func:`fflayers.memories.trigger_examples.trigger_examples`).

The state after each shard is one ``torch.save`` file, written atomically, holding the top-k buffers and the
number of shards and sentences done, tagged with a digest of everything the result depends on
(:func:`config_digest`: model keys and sizes, sentences, ``k``, layers, dims, batching settings and world
size), so that a resume with other inputs or settings fails with a clear message instead of mixing results.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.memories.topk import StreamingTopK

__all__ = ["CHECKPOINT_NAME", "config_digest", "save_checkpoint", "load_checkpoint"]

#: file name of the state in ``checkpoint_dir`` (``.rank{r}-of-{world}`` added per rank when distributed)
CHECKPOINT_NAME = "trigger_examples_state.pt"


def _sentences_digest(sentences: Sequence[Sequence[int]]) -> str:
    from fflayers.memories.scan import sentences_digest

    return sentences_digest(sentences)


def _model_digest(adapter: LMAdapter, layer: int) -> str:
    h = hashlib.sha256()
    h.update(repr((type(adapter).__name__, adapter.n_layers, adapter.d_model, adapter.d_ff,
                   adapter.vocab_size)).encode())
    keys = adapter.ffn_keys(layer).detach().to("cpu", torch.float32).contiguous()
    h.update(keys.numpy().tobytes())
    return h.hexdigest()


def config_digest(adapter: LMAdapter, sentences: Sequence[Sequence[int]], k: int, layers: list[int],
                  dims: list[int], batch_tokens: int, shard_size: object, world: int) -> str:
    """SHA-256 hex digest of a mining run's inputs and settings: the model's sizes and the keys of its first
    mined layer, the sentences, and the ``repr`` of ``(k, layers, dims, batch_tokens, shard_size, world)``
    (``shard_size`` may be any value with a stable ``repr``, e.g. a tuple of settings)."""
    parts = [_model_digest(adapter, layers[0]), _sentences_digest(sentences),
             repr((k, layers, dims, batch_tokens, shard_size, world))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def save_checkpoint(path: Path, config_hash: str, done_shards: int, done_sentences: int,
                    topk: StreamingTopK) -> None:
    """Write the mining state (atomically) to ``path``, tagged with ``config_hash``."""
    from fflayers.io import atomic_write

    with atomic_write(path, "wb") as f:
        torch.save({"config_hash": config_hash, "done_shards": done_shards, "done_sentences": done_sentences,
                    "topk": topk.state_dict()}, f)


def load_checkpoint(path: Path, config_hash: str) -> dict | None:
    """The state saved at ``path`` (None when there is no file); fails when it is unreadable or was made with
    another ``config_hash``."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise InputError(f"checkpoint {path} is unreadable ({type(err).__name__}); delete it to start "
                           "over") from None
    if state.get("config_hash") != config_hash:
        raise InputError(
            f"checkpoint {path} was made with other inputs or settings (sentences, model, k, layers, dims, "
            "batch_tokens or shard_size differ); rerun with the same ones, or delete it to start over"
        )
    return state
