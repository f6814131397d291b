"""Subject enrichment (Geva et al., 2023, section 5): how many subject-related attributes a hidden state
encodes.

The *attributes rate* of a vector ``h`` for a subject:

1. read ``h`` in the vocabulary (:func:`fflayers.recall.projection.project_topk`, through the final norm by
   default) and take its top ``top`` (500) tokens;
2. walk them in rank order, dropping stopwords (scikit-learn's ``ENGLISH_STOP_WORDS``) and tokens of at most
   two characters, and keep the first ``keep`` (50) that remain (:func:`candidate_tokens`). A token's text is
   compared without its leading-space marker (``" "``, ``"Ġ"``, ``"▁"``) or surrounding spaces, in lower case;
3. the rate is the share of the kept tokens found among the tokens of the paragraphs about the subject (same
   comparison: ``" Paris"`` and ``"paris"`` match).

A paragraph is *about* the subject when it mentions it: the subject string occurs in the paragraph as a whole
word sequence (case-sensitive; not preceded or followed by a letter or digit). Paragraphs are the lines of a
corpus file read with :func:`fflayers.data.readers.read_corpus` (WikiText lines are detokenized for matching
and for subword models). The tokens of a paragraph are the model's own tokens of it.

The baseline reads the subject's input embedding (of the token at the same position) the same way.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.recall.facts import EncodedFact
from fflayers.recall.projection import (
    batch_positions,
    gather_rows,
    numbered_batches,
    position_index,
    project_topk,
    rows_by_fact,
)

__all__ = ["TOKEN_MARKERS", "bare_token", "is_attribute_candidate", "candidate_tokens", "mentions",
           "read_paragraphs", "AttributeScorer", "attributes_rate", "attributes_rate_summary"]

#: leading-space markers of subword vocabularies (GPT-2 byte-level BPE, SentencePiece)
TOKEN_MARKERS = ("Ġ", "▁")


def bare_token(token: str) -> str:
    """A token's text for comparisons: markers and surrounding spaces removed, lower case."""
    text = token.strip()
    while text[:1] in TOKEN_MARKERS and text:
        text = text[1:]
    return text.strip().lower()


@functools.cache
def _stopwords() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def _is_candidate_bare(bare: str) -> bool:
    return len(bare) > 2 and bare not in _stopwords()


def is_attribute_candidate(token: str) -> bool:
    """False for stopwords (scikit-learn's English list) and tokens of <= 2 characters (bare text)."""
    return _is_candidate_bare(bare_token(token))


def candidate_tokens(tokens: Sequence[str], keep: int = 50) -> list[int]:
    """Indices (in ``tokens``' order, i.e. rank order) of the first ``keep`` attribute candidates."""
    out: list[int] = []
    for i, tok in enumerate(tokens):
        if len(out) >= keep:
            break
        if is_attribute_candidate(tok):
            out.append(i)
    return out


def mentions(paragraph: str, subject: str) -> bool:
    """True when ``subject`` occurs in ``paragraph`` as whole words (case-sensitive)."""
    return re.search(rf"(?<![^\W_]){re.escape(subject)}(?![^\W_])", paragraph) is not None


def read_paragraphs(path: str | Path, fmt: str = "auto", field_name: str = "text") -> list[str]:
    """Paragraphs of a corpus file (one per line; WikiText headings skipped, its tokenization undone)."""
    from fflayers.data.readers import detect_format, read_corpus
    from fflayers.data.wikitext import detokenize_wikitext

    lines = read_corpus(path, fmt=fmt, field=field_name)
    if (detect_format(path) if fmt == "auto" else fmt) == "wikitext":
        lines = [detokenize_wikitext(line) for line in lines]
    return lines


@dataclass
class AttributeScorer:
    """Attributes rates of vectors for a set of facts, with everything that does not depend on the vector
    precomputed: the vocabulary's bare texts (as group ids), its candidate mask, and per subject the groups of
    the tokens of its paragraphs."""

    adapter: LMAdapter
    top: int = 500
    keep: int = 50
    final_norm: bool = True
    groups: torch.Tensor = field(init=False)  # [V] group id of each token's bare text
    candidate: torch.Tensor = field(init=False)  # [V] bool
    subject_groups: dict[str, torch.Tensor] = field(init=False, default_factory=dict)
    subject_paragraphs: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.top < 1 or self.keep < 1:
            raise InputError(f"top={self.top} and keep={self.keep} must be >= 1")
        bare = [bare_token(t) for t in self.adapter.vocab.tokens]
        ids: dict[str, int] = {}
        self.groups = torch.tensor([ids.setdefault(t, len(ids)) for t in bare], dtype=torch.long)
        self.candidate = torch.tensor([_is_candidate_bare(t) for t in bare], dtype=torch.bool)

    def add_paragraphs(self, subjects: Sequence[str], paragraphs: Sequence[str]) -> None:
        """Find each subject's paragraphs and the groups of their tokens."""
        token_cache: dict[int, list[int]] = {}
        for subject in dict.fromkeys(subjects):
            found = [i for i, p in enumerate(paragraphs) if mentions(p, subject)]
            ids: list[int] = []
            for i in found:
                if i not in token_cache:
                    token_cache[i] = self.adapter.vocab.tokenize(paragraphs[i], add_bos=False)
                ids += token_cache[i]
            groups = (self.groups[torch.tensor(sorted(set(ids)), dtype=torch.long)] if ids
                      else torch.zeros(0).long())
            self.subject_groups[subject] = groups.unique()
            self.subject_paragraphs[subject] = len(found)

    def kept_tokens(self, vectors: torch.Tensor) -> list[list[int]]:
        """Per vector ``[N, d]``: the kept token ids (at most ``keep``), in rank order."""
        _, ids = project_topk(self.adapter, vectors, self.top, self.final_norm)
        ids = ids.cpu()
        cand = self.candidate[ids]
        return [row[mask][: self.keep].tolist() for row, mask in zip(ids, cand, strict=True)]

    def rates(self, vectors: torch.Tensor, subjects: Sequence[str]) -> list[tuple[int, int]]:
        """Per vector: (number of kept tokens, number of them found in its subject's paragraphs)."""
        out = []
        for kept, subject in zip(self.kept_tokens(vectors), subjects, strict=True):
            groups = self.subject_groups.get(subject)
            if groups is None:
                raise InputError(f"no paragraphs were looked up for subject {subject!r}; call add_paragraphs")
            hits = (int(torch.isin(self.groups[torch.tensor(kept, dtype=torch.long)], groups).sum())
                    if kept else 0)
            out.append((len(kept), hits))
        return out


COLUMNS = ["known_id", "subject", "source", "layer", "position", "token_position", "n_paragraphs", "n_kept",
           "n_found", "rate"]


@torch.inference_mode()
def attributes_rate(
    adapter: LMAdapter,
    encoded: Sequence[EncodedFact],
    paragraphs: Sequence[str],
    layers: Sequence[int] | None = None,
    positions: Sequence[str | int] = ("subject_last",),
    top: int = 500,
    keep: int = 50,
    final_norm: bool = True,
    baseline: bool = True,
    batch_size: int = 16,
    scorer: AttributeScorer | None = None,
) -> pd.DataFrame:
    """Attributes rate of ``resid_post`` at each layer and position of each fact (see the module docstring).

    One row per fact x source x layer x position: ``known_id``, ``subject``, ``source`` (``"resid_post"``, or
    ``"embedding"`` for the input-embedding baseline, with ``layer`` -1), ``layer``, ``position``,
    ``token_position``, ``n_paragraphs`` (paragraphs about the subject), ``n_kept``, ``n_found`` and ``rate``
    (``n_found / n_kept``; NaN for a subject without paragraphs).
    """
    from fflayers.hooks import capture

    layers = list(range(adapter.n_layers)) if layers is None else [adapter.check_layer(x) for x in layers]
    if not positions:
        raise InputError("choose at least one position")
    for item in encoded[:1]:
        for pos in positions:
            position_index(item, pos)
    scorer = scorer or AttributeScorer(adapter, top=top, keep=keep, final_norm=final_norm)
    scorer.add_paragraphs([e.fact.subject for e in encoded], paragraphs)
    embeddings = adapter.input_embeddings().detach() if baseline else None
    rows: list[tuple[int, dict]] = []  # (fact index, row): rows come out fact by fact
    for offset, batch in numbered_batches(adapter, encoded, batch_size):
        with capture(adapter, "resid_post", layers) as cache:
            adapter.run(batch.ids, batch.mask)
        subjects = [item.fact.subject for item in batch.items]
        for pos in positions:
            index = batch_positions(batch, pos)
            sources = [("resid_post", layer, gather_rows(cache["resid_post", layer], index))
                       for layer in layers]
            if embeddings is not None:
                token_ids = gather_rows(batch.ids[..., None], index)[:, 0]
                sources.insert(0, ("embedding", -1, embeddings[token_ids.to(embeddings.device)]))
            vectors = torch.cat([v for _, _, v in sources])
            scores = scorer.rates(vectors, subjects * len(sources))
            for si, (source, layer, _) in enumerate(sources):
                for b, item in enumerate(batch.items):
                    n_kept, n_found = scores[si * len(batch) + b]
                    n_par = scorer.subject_paragraphs[item.fact.subject]
                    rows.append((offset + b, {"known_id": item.fact.known_id, "subject": item.fact.subject,
                                 "source": source, "layer": layer, "position": str(pos),
                                 "token_position": int(index[b]), "n_paragraphs": n_par, "n_kept": n_kept,
                                 "n_found": n_found,
                                 "rate": n_found / n_kept if n_par and n_kept else float("nan")}))
    return pd.DataFrame(rows_by_fact(rows), columns=COLUMNS)


def attributes_rate_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean rate per source x position x layer over the facts with paragraphs (``n_facts``, ``rate``)."""
    ok = table.dropna(subset=["rate"])
    g = ok.groupby(["source", "position", "layer"], sort=False)["rate"]
    return g.agg(n_facts="size", rate="mean").reset_index()
