"""The model's vocabulary (``adapter.vocab``): text <-> token ids, token strings and the special ids.

Every backend gives its adapter one :class:`Vocabulary`; analyses ask it, never the tokenizer or the fairseq
dictionary directly. A special id the model does not have is None.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from fflayers.core import ModelError

__all__ = ["Vocabulary"]


class Vocabulary(ABC):
    """Tokenization, id <-> token and the special ids of one model; ``size`` ids ``0 .. size - 1``."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self._tokens: list[str] | None = None

    # ----- special ids --------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def pad_id(self) -> int:
        """The id right-padded batches are filled with (the model never attends to it)."""

    @property
    def bos_id(self) -> int | None:
        """The id :meth:`tokenize` puts first with ``add_bos`` (None when the model has none)."""
        return None

    @property
    def eos_id(self) -> int | None:
        """The end-of-sentence id, or None."""
        return None

    @property
    def unk_id(self) -> int | None:
        """The unknown-token id, or None."""
        return None

    @property
    def mask_id(self) -> int | None:
        """The mask id of a masked LM, or None."""
        return None

    @property
    def mask_token(self) -> str:
        """The mask token's text (``"[MASK]"`` when the tokenizer names none)."""
        return "[MASK]"

    @property
    def special_ids(self) -> set[int]:
        """Ids that are not text: pad, bos, eos, unk, mask (those the model has)."""
        ids = (self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.mask_id)
        return {i for i in ids if i is not None}

    # ----- text <-> ids ------------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_bos`` adds the model's own leading special tokens."""

    def tokenize_with_offsets(self, text: str,
                              add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`tokenize` plus each token's character span ``(start, end)`` in ``text``."""
        raise ModelError(f"{type(self).__name__} cannot map tokens to character offsets; "
                         "use a backend with a fast tokenizer")

    @abstractmethod
    def id_to_token(self, ids: Sequence[int]) -> list[str]:
        """The string of each id."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of a sequence of ids."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` when it is one vocabulary entry, else None."""

    @property
    def tokens(self) -> list[str]:
        """The string of every id ``0 .. size - 1`` (as :meth:`id_to_token` writes it), computed once."""
        if self._tokens is None:
            self._tokens = self.id_to_token(list(range(self.size)))
        return self._tokens

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"
