"""Residual-stream states of sampled positions, at every layer boundary.

State 0 is the stream entering block 0 (hook point ``resid_pre`` of layer 0); state ``l`` (1..L) is the
output of block ``l - 1`` (``resid_post``), so state L is before the final norm. Positions are run in their
given order in right-padded batches with an attention mask; positions that share one input (several of a
sentence) are read from one sequence of the batch; each hook keeps only the rows read, so memory holds
``[b, L+1, d]`` per batch, not whole activations.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.data.batching import pad_right
from fflayers.hooks import hooked
from fflayers.shortcuts.positions import Position


def check_positions(positions: Sequence[Position], batch_size: int) -> None:
    """:class:`~fflayers.core.InputError` unless ``batch_size`` is positive and every position reads a row of
    its input."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r} must be a positive integer")
    if len(positions) == 0:
        raise InputError("no positions to read states at; sample positions first (sample_positions)")
    for k, p in enumerate(positions):
        if not 0 <= p.read_at < len(p.input_ids):
            raise InputError(f"position {k} reads row {p.read_at} of a {len(p.input_ids)}-token input; "
                               "build positions with sample_positions")


def collate_positions(batch: Sequence[Position],
                      pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids ``[b, T]``, attention mask ``[b, T]`` and read rows ``[b]`` (CPU) of a batch of
    positions."""
    ids, mask = pad_right([p.input_ids for p in batch], pad_id)
    read_at = torch.tensor([p.read_at for p in batch], dtype=torch.long)
    return ids, mask, read_at


def collate_shared(batch: Sequence[Position],
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`collate_positions` with each distinct input once: right-padded ids ``[s, T]``, attention
    mask ``[s, T]``, and per position the sequence ``rows[b]`` and row ``read_at[b]`` that hold its state (for
    reading states only: an edit at one position of a shared sequence would reach its later positions)."""
    index: dict[tuple[int, ...], int] = {}
    rows = [index.setdefault(p.input_ids, len(index)) for p in batch]
    ids, mask = pad_right(list(index), pad_id)
    read_at = torch.tensor([p.read_at for p in batch], dtype=torch.long)
    return ids, mask, torch.tensor(rows, dtype=torch.long), read_at


def _read_states(adapter: LMAdapter, batch: Sequence[Position]) -> torch.Tensor:
    """Run one batch of positions (each distinct input once) and keep, per position, its row at every state:
    ``[b, L+1, d]``."""
    dev = adapter.device
    ids, mask, rows, read_at = (t.to(dev) for t in collate_shared(batch, adapter.vocab.pad_id))
    out = torch.empty(len(batch), adapter.n_layers + 1, adapter.d_model, dtype=torch.float32, device=dev)

    def keeper(s: int):
        def fn(x: torch.Tensor):
            out[:, s] = x[rows, read_at].float()
            return None

        return fn

    hooks = [("resid_pre", 0, keeper(0))] + [("resid_post", layer, keeper(layer + 1))
                                             for layer in range(adapter.n_layers)]
    with hooked(adapter, hooks), torch.inference_mode():
        adapter.run(ids, mask)
    return out


def iter_state_batches(adapter: LMAdapter, positions: Sequence[Position],
                       batch_size: int = 32) -> Iterator[torch.Tensor]:
    """States ``[b, L+1, d]`` (float32, on the adapter's device) of consecutive chunks of ``batch_size``
    positions, one forward pass each."""
    check_positions(positions, batch_size)

    def generate() -> Iterator[torch.Tensor]:
        for start in range(0, len(positions), batch_size):
            yield _read_states(adapter, positions[start : start + batch_size])

    return generate()


def collect_states(
    adapter: LMAdapter, positions: Sequence[Position], batch_size: int = 32, progress: bool = False
) -> torch.Tensor:
    """All states ``[n, L+1, d]`` (float32, CPU), row ``k`` for ``positions[k]``."""
    from tqdm.auto import tqdm

    batches = iter_state_batches(adapter, positions, batch_size)
    out = torch.empty(len(positions), adapter.n_layers + 1, adapter.d_model, dtype=torch.float32)
    done = 0
    with tqdm(total=len(positions), disable=not progress, unit="pos", desc="states") as bar:
        for states in batches:
            out[done : done + states.shape[0]] = states.cpu()
            done += states.shape[0]
            bar.update(states.shape[0])
    return out
