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

from fflayers.core import RunStateError

__all__ = ["Accumulator", "PiecesTask", "UnitPieces", "from_state", "merge_parts", "merge_all",
           "merge_piece_states"]

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


class UnitPieces:
    """Results keyed by the unit that made them (row blocks of a table, records of facts), read back in unit
    order: ``add(unit, piece)``, ``merge`` (the union; a unit held by both sides is refused), ``state_dict``
    (``{"pieces": [[unit, piece], ...]}`` in unit order) and ``load_state_dict``.

    The merge of any parts in any order gives the same :meth:`pieces`, so results computed over shards,
    ranks or job-array jobs are put together exactly as one process would have made them.
    """

    def __init__(self) -> None:
        self._pieces: dict[int, Any] = {}

    def add(self, unit: int, piece: Any) -> None:
        """Hold ``piece``, the result of ``unit``."""
        unit = int(unit)
        if unit in self._pieces:
            raise ValueError(f"unit {unit} was added twice; each unit's result is added once")
        self._pieces[unit] = piece

    def merge(self, other: UnitPieces) -> None:
        """Take in the pieces of ``other`` (of other units)."""
        for unit, piece in other._pieces.items():
            self.add(unit, piece)

    def pieces(self) -> list[Any]:
        """The pieces in unit order."""
        return [self._pieces[u] for u in sorted(self._pieces)]

    def units(self) -> list[int]:
        """The units held, in order."""
        return sorted(self._pieces)

    def items(self) -> list[tuple[int, Any]]:
        """``(unit, piece)`` pairs in unit order."""
        return [(u, self._pieces[u]) for u in sorted(self._pieces)]

    def clear(self) -> None:
        """Let go of every piece (their memory, once the caller holds what it needs)."""
        self._pieces.clear()

    def state_dict(self) -> dict:
        return {"pieces": [list(item) for item in self.items()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pieces = {}
        for unit, piece in state["pieces"]:
            self.add(unit, piece)


def merge_piece_states(states: Iterable[Mapping[str, Any]]) -> dict:
    """Saved :class:`UnitPieces` states merged into one state (the merge of ``fflayers merge``)."""
    return merge_all(states, UnitPieces).state_dict()


class PiecesTask:
    """The merge and saved state of a run task (:class:`fflayers.runs.UnitTask`) whose partial results are
    :class:`UnitPieces`: a subclass only computes its units."""

    def merge(self, parts: list[UnitPieces]) -> UnitPieces:
        return merge_parts(parts) if parts else UnitPieces()

    def to_state(self, part: UnitPieces) -> dict:
        return part.state_dict()

    def from_state(self, state: Mapping[str, Any]) -> UnitPieces:
        if not isinstance(state, Mapping) or "pieces" not in state:
            raise RunStateError("the run folder holds a shard in the layout of an earlier fflayers version; "
                                "remove the run folder (OUTPUT.ckpt) and run again")
        return from_state(UnitPieces, state)
