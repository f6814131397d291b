"""Sample positions of sentences for fitting linear shortcuts between layers.

Causal LMs read the prediction of a position at that position after seeing its prefix, so a position's input
is the prefix ending there; several positions of one sentence share one input (the sentence up to the last of
them), read at their own rows in one forward pass. Masked LMs read it at a masked copy of the token inside the
whole sentence (one input per position).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError

#: how positions are drawn from each sentence: one or more at random, or every eligible one
POSITION_MODES = ("random", "all")


@dataclass(frozen=True)
class Position:
    """One sampled position: ``input_ids`` is what the model reads, its state is read at row ``read_at``."""

    sentence_index: int
    position: int
    input_ids: tuple[int, ...]
    read_at: int


def _ids(sentence: Sequence[int], i: int) -> list[int]:
    if isinstance(sentence, (str, bytes)):
        raise InputError(f"sentence {i} is a string; tokenize the text first and pass lists of token ids")
    try:
        return [int(t) for t in sentence]
    except (TypeError, ValueError):
        raise InputError(f"sentence {i} holds something other than integer token ids; "
                         "pass lists of token ids") from None


def sample_positions(
    adapter: LMAdapter, sentences: Sequence[Sequence[int]], seed: int = 0, mask_id: int | None = None,
    mode: str = "random", per_sentence: int = 1,
) -> list[Position]:
    """Positions of each sentence: ``per_sentence`` distinct random ones (``mode="random"``, the paper's
    protocol at the default 1) or every eligible one (``mode="all"``), in sentence then position order.
    Random draws use ``numpy.random.default_rng(seed)``: one draw per kept sentence, in order, for one
    position (``rng.choice`` without replacement, sorted, for more).

    Causal LMs: a real token (not a leading ``adapter.vocab.bos_id``) within the model's window; the input is
    the prefix ending at the sentence's last chosen position and ``read_at`` the position's own row (with one
    position per sentence, the prefix ending there). Masked LMs: a non-special token
    (``adapter.vocab.special_ids``), replaced by the mask id (``mask_id``, else the tokenizer's, else the
    config's); the input is the whole sentence and ``read_at`` the masked row. Sentences without an eligible
    position (a lone BOS, only special tokens) are skipped; :class:`~fflayers.core.InputError` if none remain.
    """
    if isinstance(sentences, (str, bytes)) or len(sentences) == 0:
        raise InputError("no sentences to sample positions from; pass a non-empty list of token-id sequences")
    if mode not in POSITION_MODES:
        raise InputError(f"positions mode {mode!r} is unknown; use one of {', '.join(POSITION_MODES)}")
    if isinstance(per_sentence, bool) or not isinstance(per_sentence, int) or per_sentence < 1:
        raise InputError(f"per_sentence={per_sentence!r} must be a positive integer")
    rng = np.random.default_rng(seed)
    limit = adapter.max_positions
    masked = adapter.is_masked_lm
    if masked:
        mask_id = adapter.vocab.mask_id if mask_id is None else mask_id
        if not isinstance(mask_id, int) or isinstance(mask_id, bool):
            raise InputError("this masked LM has no mask token id; load its tokenizer or pass mask_id=...")
        special = adapter.vocab.special_ids | {mask_id}
    bos = adapter.vocab.bos_id
    out: list[Position] = []
    for si, sentence in enumerate(sentences):
        ids = _ids(sentence, si)
        if masked:
            if limit is not None and len(ids) > limit:
                raise InputError(f"sentence {si} has {len(ids)} tokens, more than the model's {limit} "
                                 "positions; truncate or split the sentences")
            eligible = [p for p, t in enumerate(ids) if t not in special]
        else:
            start = 1 if ids and bos is not None and ids[0] == bos else 0
            stop = len(ids) if limit is None else min(len(ids), limit)
            eligible = list(range(start, stop))
        if not eligible:
            continue
        chosen = _choose(eligible, mode, per_sentence, rng)
        if masked:
            for p in chosen:
                masked_ids = list(ids)
                masked_ids[p] = mask_id
                out.append(Position(si, p, tuple(masked_ids), p))
        else:
            prefix = tuple(ids[: chosen[-1] + 1])
            out.extend(Position(si, p, prefix, p) for p in chosen)
    if not out:
        raise InputError(f"none of the {len(sentences)} sentences has a position to sample (only BOS or "
                         "special tokens); pass longer sentences")
    return out


def _choose(eligible: list[int], mode: str, per_sentence: int, rng: np.random.Generator) -> list[int]:
    """The chosen positions of one sentence, ascending."""
    if mode == "all":
        return list(eligible)
    if per_sentence == 1:
        return [eligible[int(rng.integers(len(eligible)))]]
    if per_sentence >= len(eligible):
        return list(eligible)
    return sorted(int(eligible[k]) for k in rng.choice(len(eligible), size=per_sentence, replace=False))


def positions_frame(positions: Sequence[Position], split: str):
    """A pandas DataFrame with columns split, sentence_index, position, input_ids (a list per row)."""
    import pandas as pd

    return pd.DataFrame({
        "split": [split] * len(positions),
        "sentence_index": [p.sentence_index for p in positions],
        "position": [p.position for p in positions],
        "input_ids": [list(p.input_ids) for p in positions],
    }, columns=["split", "sentence_index", "position", "input_ids"])


def positions_from_frame(table, split: str) -> list[Position]:
    """The positions of one ``split`` of a :func:`positions_frame` table (also read back from parquet). The
    state is read at ``position`` in both cases: the last row of a causal prefix, the masked row of a masked
    LM."""
    rows = table[table["split"] == split]
    return [Position(int(r.sentence_index), int(r.position), tuple(int(t) for t in r.input_ids),
                     int(r.position))
            for r in rows.itertuples(index=False)]


def corpus_sentences(adapter: LMAdapter, data_file: str, n_train: int, n_val: int, seed: int = 0,
                     raw_wikitext: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of ``n_train`` training then ``n_val`` validation sentences of a corpus (shuffled with
    ``seed``; sentences of one token dropped, long ones cut to the model's window). A short corpus gives fewer
    (at least one validation sentence); :class:`~fflayers.core.InputError` below two usable sentences."""
    from fflayers.data import model_sentences

    wanted = n_train + n_val
    texts = model_sentences(adapter, data_file, seed, wanted, raw_wikitext)
    limit = adapter.max_positions or 10**9
    ids = [seq[:limit] for seq in (adapter.vocab.tokenize(t) for t in texts) if len(seq) > 1]
    if len(ids) < 2:
        raise InputError(f"the corpus yields {len(ids)} usable sentences; pass a larger corpus")
    n = min(n_train, len(ids) - 1) if len(ids) < wanted else n_train
    return ids[:n], ids[n:wanted]
