"""Sentence splitting with pySBD (rule-based, no downloads), for raw and pre-tokenized text.

Pre-tokenized lines (WikiText: tokens separated by single spaces, ``@-@`` style escapes) are split at token
boundaries only: each output sentence is a run of the line's tokens joined by single spaces, and the
sentences of a line, concatenated, give back exactly the line's tokens. pySBD itself sees a lightly
detokenized rendering of the line (``3 @.@ 5`` -> ``3.5``, no space before ``.`` or ``,``), which keeps it
from cutting inside escapes such as ``@.@``; its boundaries are then mapped back to token positions.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache

from fflayers.core import InputError

_ESCAPE = re.compile(r"^@(.)@$")  # WikiText escapes: @-@ @,@ @.@
_NO_SPACE_BEFORE = frozenset(
    {
        ".",
        ",",
        ";",
        ":",
        "!",
        "?",
        ")",
        "]",
        "}",
        "%",
        "...",
        "'s",
        "'S",
        "n't",
        "'re",
        "'ve",
        "'ll",
        "'d",
        "'m",
    }
)
_NO_SPACE_AFTER = frozenset({"(", "[", "{", "$", "#"})


@lru_cache(maxsize=8)
def _segmenter(language: str):
    import pysbd

    try:
        return pysbd.Segmenter(language=language, clean=False)
    except ValueError as e:  # pysbd raises ValueError for unsupported language codes
        raise InputError(
            f"pysbd has no sentence rules for language {language!r} ({e}); use e.g. 'en'"
        ) from None


def _render(tokens: list[str]) -> tuple[str, list[int]]:
    """Detokenized text of ``tokens`` and the character offset where each token starts in it."""
    parts: list[str] = []
    starts: list[int] = []
    pos = 0
    glue_next = True  # no space before the first token
    for tok in tokens:
        m = _ESCAPE.match(tok)
        shown = m.group(1) if m else tok
        glue = glue_next or m is not None or tok in _NO_SPACE_BEFORE
        if not glue:
            parts.append(" ")
            pos += 1
        starts.append(pos)
        parts.append(shown)
        pos += len(shown)
        glue_next = m is not None or tok in _NO_SPACE_AFTER
    return "".join(parts), starts


def split_pretokenized_line(line: str, language: str = "en") -> list[str]:
    """Sentences of one space-tokenized line; ``" ".join(result).split() == line.split()``."""
    tokens = line.split()
    if not tokens:
        return []
    text, token_starts = _render(tokens)
    # Locate each pySBD segment in the rendered text, in order; a segment it cannot find adds no boundary.
    sent_starts = [0]
    cursor = 0
    for seg in _segmenter(language).segment(text):
        seg = seg.strip()
        if not seg:
            continue
        found = text.find(seg, cursor)
        if found < 0:
            continue
        if found > sent_starts[-1]:
            sent_starts.append(found)
        cursor = found + len(seg)
    groups: list[list[str]] = [[] for _ in sent_starts]
    for tok, start in zip(tokens, token_starts, strict=True):
        groups[bisect.bisect_right(sent_starts, start) - 1].append(tok)
    return [" ".join(g) for g in groups if g]


def split_raw_text(text: str, language: str = "en") -> list[str]:
    """pySBD sentences of raw text, stripped, empty ones dropped."""
    if not text.strip():
        return []
    return [s.strip() for s in _segmenter(language).segment(text) if s.strip()]


def iter_sentences(lines: Iterable[str], pretokenized: bool, language: str = "en") -> Iterator[str]:
    """Sentences of ``lines`` in order (lazy: lines are split only as sentences are consumed)."""
    split = split_pretokenized_line if pretokenized else split_raw_text
    for line in lines:
        yield from split(line, language)


def split_sentences(lines: Iterable[str], pretokenized: bool, language: str = "en") -> list[str]:
    """All sentences of ``lines``, in order. See :func:`split_pretokenized_line` for pre-tokenized input."""
    if isinstance(lines, str):
        raise InputError("split_sentences expects a list of lines, got one string; wrap it in a list")
    return list(iter_sentences(lines, pretokenized, language))


def shuffled_sentences(
    lines: Iterable[str],
    seed: int = 0,
    max_sentences: int = -1,
    pretokenized: bool = True,
    language: str = "en",
) -> list[str]:
    """Shuffle lines with ``random.Random(seed)``, split into sentences, keep the first ``max_sentences``.

    ``max_sentences=-1`` keeps all. Deterministic for a given seed and input; the input is not modified.
    Lines are split lazily, so a small ``max_sentences`` over a large corpus only splits the lines it needs.
    """
    if isinstance(lines, str):
        raise InputError("shuffled_sentences expects a list of lines, got one string; wrap it in a list")
    if max_sentences == 0 or max_sentences < -1:
        raise InputError(f"max_sentences={max_sentences} is invalid; pass a positive number, or -1 for all")
    order = list(lines)
    random.Random(seed).shuffle(order)
    out: list[str] = []
    for sent in iter_sentences(order, pretokenized, language):
        out.append(sent)
        if max_sentences != -1 and len(out) >= max_sentences:
            break
    return out
