"""The vocabulary of a HuggingFace model: its tokenizer, with the model config's ids where it has none."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fflayers.backends.vocabulary import Vocabulary
from fflayers.core import ModelError

__all__ = ["HFVocabulary"]


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class HFVocabulary(Vocabulary):
    """A HuggingFace tokenizer (or None: ids only) over ``size`` ids; ``config`` is the model config."""

    def __init__(self, tokenizer: Any, config: Any, size: int) -> None:
        super().__init__(size)
        self.tokenizer = tokenizer
        self.config = config
        self._bos: tuple[int | None] | None = None

    def _tok(self) -> Any:
        if self.tokenizer is None:
            raise ModelError("this adapter has no tokenizer; pass tokenizer= when building it, "
                             "or give token ids")
        return self.tokenizer

    def _tok_id(self, name: str) -> int | None:
        return _int_or_none(getattr(self.tokenizer, name, None))

    def _config_id(self, name: str) -> int | None:
        return _int_or_none(getattr(self.config, name, None))

    @property
    def pad_id(self) -> int:
        for value in (self._tok_id("pad_token_id"), self._tok_id("eos_token_id"),
                      self._config_id("pad_token_id"), self._config_id("eos_token_id")):
            if value is not None:
                return value
        return 0

    @property
    def bos_id(self) -> int | None:
        """The tokenizer's BOS id when :meth:`tokenize` really puts it first (Llama), else None (GPT-2 names
        ``<|endoftext|>`` as BOS but never adds it)."""
        if self._bos is None:
            bos = self._tok_id("bos_token_id")
            if bos is not None and callable(self.tokenizer):
                first = self.tokenizer("a", add_special_tokens=True)["input_ids"][:1]
                bos = bos if first == [bos] else None
            self._bos = (bos,)
        return self._bos[0]

    @property
    def eos_id(self) -> int | None:
        return self._tok_id("eos_token_id")

    @property
    def unk_id(self) -> int | None:
        return self._tok_id("unk_token_id")

    @property
    def mask_token(self) -> str:
        return getattr(self.tokenizer, "mask_token", None) or "[MASK]"

    @property
    def mask_id(self) -> int | None:
        """The tokenizer's mask id, else the config's, else the id of the single token ``[MASK]``."""
        for value in (self._tok_id("mask_token_id"), self._config_id("mask_token_id")):
            if value is not None:
                return value
        return self.token_to_id(self.mask_token) if self.tokenizer is not None else None

    @property
    def special_ids(self) -> set[int]:
        """The tokenizer's special ids; without a tokenizer the config's pad/bos/eos/cls/sep ids."""
        tok = self.tokenizer
        if tok is not None and hasattr(tok, "all_special_ids"):
            return set(tok.all_special_ids)
        names = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")
        return {i for i in map(self._config_id, names) if i is not None}

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids; ``add_bos`` adds the tokenizer's own special tokens (BOS for Llama, [CLS]/[SEP] for
        BERT)."""
        return list(self._tok()(text, add_special_tokens=add_bos)["input_ids"])

    def tokenize_with_offsets(self, text: str,
                              add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`tokenize` plus the fast tokenizer's offset mapping (a byte-level BPE token such as
        ``" France"`` may or may not include its leading space, depending on the tokenizer's
        ``trim_offsets``)."""
        tok = self._tok()
        if not getattr(tok, "is_fast", False):
            raise ModelError(f"character offsets need a fast tokenizer; {type(tok).__name__} is a slow one "
                             "(load the model's tokenizer with use_fast=True / tokenizer.json)")
        enc = tok(text, add_special_tokens=add_bos, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    def id_to_token(self, ids: Sequence[int]) -> list[str]:
        tok = self._tok()
        return [tok.decode([int(i)]) for i in ids]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok().decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        tok = self._tok()
        ids = tok(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            return None
        if ids[0] == self.unk_id and token != getattr(tok, "unk_token", None):
            return None  # WordPiece maps any unknown word to [UNK]: not an entry
        return ids[0]
