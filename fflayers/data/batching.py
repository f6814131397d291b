"""Length-bucketed batching of token-id sequences.

Sequences are sorted by length (longest first, stable: equal lengths keep their input order) and packed
greedily so that every batch holds at most ``batch_tokens`` padded tokens (``B * T_max``); a single sequence
longer than that still gets a batch of its own. Rows are right-padded with ``pad_id`` and
``attention_mask`` is True on real tokens: backends must read the mask, never compare ids with ``pad_id``.

Right padding keeps every real token at its natural position ``0..len-1``, so models with absolute
position embeddings (GPT-2 style) need no position-id correction; that correction (positions that skip
padding) is only needed for left padding, which this module never produces. With causal attention the
real tokens never attend to the padding on their right, so their activations equal those of an unpadded run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fflayers.core import InputError


@dataclass
class Batch:
    """One padded batch. Row ``r`` holds ``sequences[index[r]]`` in its first ``lengths[r]`` columns."""

    input_ids: torch.Tensor  # LongTensor [B, T], right-padded with pad_id
    attention_mask: torch.Tensor  # BoolTensor [B, T], True for real tokens
    index: list[int]  # position of each row's sequence in the input list

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real tokens per row, LongTensor ``[B]``."""
        return self.attention_mask.sum(dim=1)

    def __len__(self) -> int:
        return len(self.index)

    def sequence(self, row: int) -> list[int]:
        """The (possibly truncated) token ids of row ``row``, padding removed."""
        return self.input_ids[row, self.attention_mask[row]].tolist()

    def to(self, device: torch.device | str) -> Batch:
        """A copy on ``device``."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), list(self.index))


def _as_ids(seq: Sequence[int], i: int) -> list[int]:
    if isinstance(seq, (torch.Tensor, np.ndarray)):
        if seq.ndim != 1 or not _is_integer_dtype(seq.dtype):
            raise InputError(
                f"sequence {i} is a {seq.ndim}-d {seq.dtype} array; pass 1-d integer token ids per sequence"
            )
        return [int(t) for t in seq.tolist()]
    if isinstance(seq, (str, bytes)):
        raise InputError(f"sequence {i} is a string; tokenize the text first and pass lists of token ids")
    ids = list(seq)
    if all(type(t) is int for t in ids):  # fast path
        return ids
    for tok in ids:
        if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)):
            raise InputError(
                f"sequence {i} holds a {type(tok).__name__} ({tok!r}); pass lists of integer token ids"
            )
    return [int(t) for t in ids]


def _is_integer_dtype(dtype: torch.dtype | np.dtype) -> bool:
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return np.issubdtype(dtype, np.integer)


#: a corpus scan plans at least this many batches when it has that many sequences (see :func:`scan_batch_cap`)
MIN_SCAN_BATCHES = 64


def scan_batch_cap(n_sequences: int, min_batches: int = MIN_SCAN_BATCHES) -> int:
    """Most sequences per batch of a corpus scan: at most ``n / min_batches`` (rounded up), so that a scan of
    a few hundred sentences still has enough units for every torchrun rank and job; fixed by the data alone
    (large corpora are limited by ``batch_tokens`` first)."""
    return max(1, -(-int(n_sequences) // max(1, int(min_batches))))


def plan_batches(
    lengths: Sequence[int],
    batch_tokens: int = 4096,
    max_batch_size: int | None = None,
    sort_by_length: bool = True,
) -> list[list[int]]:
    """Group sequence indices into batches of at most ``batch_tokens`` padded tokens (see module doc)."""
    if batch_tokens < 1:
        raise InputError(f"batch_tokens={batch_tokens} must be >= 1; pass e.g. batch_tokens=4096")
    if max_batch_size is not None and max_batch_size < 1:
        raise InputError(f"max_batch_size={max_batch_size} must be >= 1 (or None for no limit)")
    order = list(range(len(lengths)))
    if sort_by_length:
        order.sort(key=lambda i: lengths[i], reverse=True)  # stable: ties keep input order
    groups: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        new_width = max(width, lengths[i])
        fits = (len(current) + 1) * new_width <= batch_tokens
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (not fits or full):
            groups.append(current)
            current, new_width = [], lengths[i]
        current.append(i)
        width = new_width
    if current:
        groups.append(current)
    return groups


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` ``[n, T]`` and ``attention_mask`` ``[n, T]`` (True for real tokens), on the
    CPU."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for r, s in enumerate(sequences):
        input_ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention_mask[r, : len(s)] = True
    return input_ids, attention_mask


def _collate(ids: list[list[int]], index: list[int], pad_id: int) -> Batch:
    return Batch(*pad_right(ids, pad_id), index)


def iter_batches(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_tokens: int = 4096,
    max_batch_size: int | None = None,
    sort_by_length: bool = True,
    max_length: int | None = None,
    truncate: bool = False,
) -> Iterator[Batch]:
    """Like :func:`make_batches`, building each batch's tensors only when it is reached.

    Input checks run at call time, before the first batch is requested.
    """
    if isinstance(sequences, (str, bytes)) or len(sequences) == 0:
        raise InputError("no sequences to batch; pass a non-empty list of token-id sequences")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise InputError(f"pad_id must be an int, got {pad_id!r}; pass the tokenizer's pad id")
    if max_length is not None and max_length < 1:
        raise InputError(f"max_length={max_length} must be >= 1 (or None for no limit)")
    ids = [_as_ids(s, i) for i, s in enumerate(sequences)]
    for i, s in enumerate(ids):
        if not s:
            raise InputError(f"sequence {i} is empty; drop empty sentences before batching")
        if max_length is not None and len(s) > max_length:
            if not truncate:
                raise InputError(
                    f"sequence {i} has {len(s)} tokens, more than max_length={max_length}; "
                    "pass truncate=True or split the text into shorter sentences"
                )
            ids[i] = s[:max_length]
    groups = plan_batches([len(s) for s in ids], batch_tokens, max_batch_size, sort_by_length)

    def generate() -> Iterator[Batch]:
        for group in groups:
            yield _collate([ids[i] for i in group], group, pad_id)

    return generate()


def make_batches(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_tokens: int = 4096,
    max_batch_size: int | None = None,
    sort_by_length: bool = True,
    max_length: int | None = None,
    truncate: bool = False,
) -> list[Batch]:
    """Right-padded, length-bucketed batches covering every sequence exactly once.

    ``batch_tokens`` bounds ``B * T_max`` per batch; ``max_batch_size`` bounds ``B``. Sequences longer than
    ``max_length`` raise :class:`~fflayers.core.InputError` unless ``truncate=True``, which keeps their first
    ``max_length`` tokens. ``Batch.index`` maps each row back to its position in ``sequences``.
    """
    return list(
        iter_batches(sequences, pad_id, batch_tokens, max_batch_size, sort_by_length, max_length, truncate)
    )
