"""The vocabulary of a fairseq LM: its ``dict.txt`` dictionary, words split on whitespace or by Moses."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fflayers.backends.vocabulary import Vocabulary

__all__ = ["FairseqVocabulary", "wikitext_numbers"]

_NUMBER_SEP = re.compile(r"^(\d+)([,.]\d+)+$")


def wikitext_numbers(token: str) -> list[str]:
    """``1,200`` -> ``1 @,@ 200`` and ``3.5`` -> ``3 @.@ 5`` (WikiText's number splitting)."""
    if not _NUMBER_SEP.match(token):
        return [token]
    out: list[str] = []
    for piece in re.split(r"([,.])", token):
        out.append(f"@{piece}@" if piece in {",", "."} else piece)
    return out


class FairseqVocabulary(Vocabulary):
    """A fairseq ``Dictionary``. ``raw_text=True`` tokenizes untokenized text with Moses (aggressive dash
    splits, ``a @-@ b``) plus WikiText's ``@,@`` / ``@.@`` number splits; the default splits on whitespace
    (pre-tokenized WikiText). Sentences start with ``</s>``, as fairseq's LMs were trained."""

    def __init__(self, dictionary: Any, raw_text: bool = False) -> None:
        super().__init__(len(dictionary))
        self.dictionary = dictionary
        self.raw_text = raw_text
        self._moses: Any = None

    @property
    def pad_id(self) -> int:
        return int(self.dictionary.pad())

    @property
    def bos_id(self) -> int | None:
        return int(self.dictionary.eos())

    @property
    def eos_id(self) -> int | None:
        return int(self.dictionary.eos())

    @property
    def unk_id(self) -> int | None:
        return int(self.dictionary.unk())

    def words(self, text: str) -> list[str]:
        """The model's word tokens of ``text`` (whitespace split, or Moses when ``raw_text``)."""
        if not self.raw_text:
            return text.split()
        if self._moses is None:
            from sacremoses import MosesTokenizer

            self._moses = MosesTokenizer(lang="en")
        toks = self._moses.tokenize(text, aggressive_dash_splits=True, escape=False)
        return [piece for tok in toks for piece in wikitext_numbers(tok)]

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.dictionary.index(w) for w in self.words(text)]
        return [self.bos_id, *ids] if add_bos else ids

    def tokenize_with_offsets(self, text: str,
                              add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`tokenize` plus each word's character span, found left to right in ``text``; the leading
        ``</s>`` gets ``(0, 0)``. Moses' ``@-@`` / ``@,@`` / ``@.@`` splits get the span of their
        character."""
        words = self.words(text)
        spans: list[tuple[int, int]] = []
        cursor = 0
        for word in words:
            for piece in (word, word.strip("@") if len(word) > 2 else word):
                start = text.find(piece, cursor)
                if start >= 0:
                    spans.append((start, start + len(piece)))
                    cursor = start + len(piece)
                    break
            else:  # an escaped or normalised word: an empty span where it would be
                spans.append((cursor, cursor))
        ids = [self.dictionary.index(w) for w in words]
        if add_bos:
            return [self.bos_id, *ids], [(0, 0), *spans]
        return ids, spans

    def id_to_token(self, ids: Sequence[int]) -> list[str]:
        return [self.dictionary[int(i)] for i in ids]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Space-joined tokens without the leading ``</s>`` and padding; WikiText's ``@-@`` / ``@,@`` /
        ``@.@`` joins are undone."""
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        text = " ".join(self.id_to_token(ids))
        return re.sub(r" @([-,.])@ ", r"\1", text)

    def token_to_id(self, token: str) -> int | None:
        idx = self.dictionary.indices.get(token)
        return None if idx is None else int(idx)
