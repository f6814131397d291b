"""The embedding matrix parameters are projected with, the vocabulary's token strings, and token filters."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import FflayersError, InputError

__all__ = ["Embedding", "embedding_matrix", "token_mask", "case_space_groups",
           "corpus_token_mask"]

SIDES = ("output", "input")


@dataclass(frozen=True)
class Embedding:
    """``E [V, d]`` and a description of where it comes from (kept in the output metadata)."""

    matrix: torch.Tensor
    kind: str


def embedding_matrix(adapter: LMAdapter, which: str = "output") -> Embedding:
    """The matrix parameters are projected with: ``"output"`` (default) is the unembedding (the vectors whose
    dot product with the final hidden state gives the logits; the one matrix in tied models; fairseq adaptive
    softmax: head rows and tail projections composed to ``d``), falling back to the input embedding for an
    encoder without an output head; ``"input"`` is the input embedding."""
    if which not in SIDES:
        raise InputError(f"unknown embedding {which!r}; use 'output' or 'input'")
    if which == "output":
        try:
            return Embedding(adapter.output_embeddings().detach(), adapter.output_embeddings_kind)
        except FflayersError:
            pass  # no output head (a BERT encoder): the input embedding is the only vocabulary matrix
    return Embedding(adapter.input_embeddings().detach(), "input embedding")


def token_mask(tokens: list[str], ascii_only: bool = False, alnum_only: bool = False) -> torch.Tensor | None:
    """Bool ``[V]`` of tokens passing the filters (None when no filter is on). ``alnum_only``: the token
    without surrounding spaces is non-empty and alphanumeric."""
    if not ascii_only and not alnum_only:
        return None
    keep = []
    for tok in tokens:
        ok = True
        if ascii_only:
            ok = tok.isascii()
        if ok and alnum_only:
            bare = tok.strip()
            ok = bool(bare) and bare.isalnum()
        keep.append(ok)
    return torch.tensor(keep, dtype=torch.bool)


def case_space_groups(tokens: list[str]) -> torch.Tensor:
    """Int ``[V]``: tokens that differ only by case and surrounding spaces share a group (``Paris`` /
    `` paris``)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(tok.strip().lower(), len(ids)) for tok in tokens], dtype=torch.long)


def corpus_token_mask(adapter: LMAdapter, lines: Iterable[str]) -> torch.Tensor:
    """Bool ``[V]`` of the token ids seen when ``adapter`` tokenizes ``lines`` (special tokens left out)."""
    seen = torch.zeros(adapter.vocab_size, dtype=torch.bool)
    for line in lines:
        ids = adapter.vocab.tokenize(line, add_bos=False)
        if ids:
            seen[torch.as_tensor(ids, dtype=torch.long).clamp(0, adapter.vocab_size - 1)] = True
    unk = adapter.vocab.unk_id
    if unk is not None:
        seen[unk] = False
    if not bool(seen.any()):
        raise InputError("no token of the token list is in the model's vocabulary; pass a corpus in the "
                           "model's language and tokenization")
    return seen


def read_token_list(adapter: LMAdapter, path: str | os.PathLike) -> torch.Tensor:
    """:func:`corpus_token_mask` over a corpus file (WikiText, text or jsonl, read like any corpus)."""
    from fflayers.data import read_corpus

    return corpus_token_mask(adapter, read_corpus(path))
