"""The state protocol of accumulators: partial results that are added to, merged, saved and restored.

An accumulator (a running sum or mean, a streaming top-k, a histogram) folds items in with ``add``, takes in
another accumulator of the same kind with ``merge``, and round-trips through ``state_dict`` /
``load_state_dict``, as baukit's runningstats do. That is all a run needs from a partial result: shard files
store ``state_dict()``, workers' parts come back as states, and the final result is the merge of them all
(:func:`merge_all`). The contract:

* ``merge`` is associative and does not depend on the order of the parts (exactly, or up to float
  rounding, which then makes results depend on the sharding), and leaves ``other`` unchanged;
* an empty accumulator is the identity of ``merge``;
* ``state_dict()`` holds only tensors, arrays, tables, numbers, strings and lists or dicts of them (what
  :func:`fflayers.safe_pickle.torch_load_restricted` reads), and ``load_state_dict(a.state_dict())`` on an
  empty accumulator gives one equal to ``a``.

A task of :func:`fflayers.runs.run_units` whose parts are accumulators has ``merge = merge_parts``,
``to_state = part.state_dict()`` and ``from_state = from_state(make, state)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Accumulator", "from_state", "merge_parts", "merge_all"]

A = TypeVar("A", bound="Accumulator")


@runtime_checkable
class Accumulator(Protocol):
    """A partial result that can be added to, merged and saved (see the module docstring)."""

    def add(self, *args: Any, **kwargs: Any) -> None:
        """Fold items in."""

    def merge(self, other: Any) -> None:
        """Take in ``other`` (an accumulator of the same kind and settings), in place."""

    def state_dict(self) -> dict:
        """Everything needed to restore the accumulator, as plain data and tensors."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (into an empty accumulator)."""


def from_state(make: Callable[[], A], state: Mapping[str, Any]) -> A:
    """A new accumulator ``make()`` holding ``state``."""
    acc = make()
    acc.load_state_dict(state)
    return acc


def merge_parts(parts: Iterable[A]) -> A:
    """The first accumulator of ``parts`` with all the others merged into it."""
    it = iter(parts)
    try:
        out = next(it)
    except StopIteration:
        raise ValueError("merge_parts needs at least one accumulator") from None
    for part in it:
        out.merge(part)
    return out


def merge_all(states: Iterable[Mapping[str, Any]], make: Callable[[], A]) -> A:
    """One accumulator holding the merge of saved ``states`` (``make()``: an empty one, the result when there
    are no states)."""
    out = make()
    for state in states:
        out.merge(from_state(make, state))
    return out
