"""What the explorer reads besides the model, as the small interfaces it needs: a lens (:class:`Reading`),
key lookups (``memories``: :class:`fflayers.memories.index.MemoryIndex`) and the value search (``values``:
:class:`fflayers.embedding_space.value_index.ValueIndex`); the stand-ins here answer when a source is not
given."""

from __future__ import annotations

from typing import Protocol

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import FflayersError
from fflayers.explore.interventions import RequestError

__all__ = ["NoMemories", "NoValues", "Reading"]


class Reading(Protocol):
    """A lens: log-probabilities ``[..., V]`` of states ``h`` ``[..., d]`` of state index ``layer`` (0 = the
    stream entering block 0, L = the last block's output)."""

    def log_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor: ...


class NoMemories:
    """No trigger examples, agreement or knowledge neurons."""

    has_triggers = has_agreement = has_neurons = False

    def triggers(self, layer: int, dim: int) -> None:
        return None

    def agreement(self, layer: int, dim: int) -> None:
        return None

    def neuron_facts(self, layer: int, dim: int) -> None:
        return None

    def search(self, text: str, limit: int) -> list[dict]:
        raise RequestError("this server has no trigger examples; start it with --memories DIR", 404)


class _Matrix:
    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix


class NoValues:
    """No value search; value pages read the output embedding (the input one for a model without a head)."""

    def __init__(self, adapter: LMAdapter) -> None:
        self.adapter = adapter
        self._embedding: _Matrix | None = None

    @property
    def embedding(self) -> _Matrix:
        if self._embedding is None:
            try:
                matrix = self.adapter.output_embeddings()
            except FflayersError:
                matrix = self.adapter.input_embeddings()
            self._embedding = _Matrix(matrix.detach())
        return self._embedding

    def search(self, token_id: int, limit: int) -> list[dict]:
        raise RequestError("this explorer has no value index; build it with a ValueIndex (fflayers explore "
                           "always has one)", 404)
