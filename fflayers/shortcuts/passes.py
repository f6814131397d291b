"""The fits' passes over positions as runs of :mod:`fflayers.runs`: resumable, split over torchrun ranks.

A pass reads rows at each position (float32): the states of the layer maps ``[n, L+1, d]``
(:class:`StatesPass`), the chain points of the submodule maps ``[n, points, d]`` (:class:`PointsPass`), and
sums their products into a float64 accumulator (:class:`~fflayers.shortcuts.GramAccumulator`,
:class:`~fflayers.shortcuts.chains.SubmoduleGram`). Its units are consecutive blocks of positions, fixed by
the positions and the block size; a unit's result is its rows (CPU), which is also what a shard file holds.

The merge folds rows into the accumulator in unit order, batch by batch as one uninterrupted pass adds them,
as soon as the units before them are in (:class:`PassPart`). The sums, hence the maps, are bit for bit those
of one pass whatever the sharding and however often the run was resumed (adding up per-shard sums would
round differently), and a one-process run holds the rows of a shard or two at a time (a resumed one also
those of the finished shards it loads, until they are folded in).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import RunStateError
from fflayers.runs import RunResult, model_fingerprint, register_merge, run_units
from fflayers.shortcuts.chains import SubmoduleGram, iter_submodule_points
from fflayers.shortcuts.linear_maps import GramAccumulator
from fflayers.shortcuts.positions import Position
from fflayers.shortcuts.states import iter_state_batches

__all__ = ["FIT_KIND", "SUBMODULES_KIND", "FitConfig", "SubmodulesConfig", "PassPart", "PositionPass",
           "StatesPass", "PointsPass", "positions_digest", "run_pass", "merge_rows_states"]

FIT_KIND = "shortcut_fit"
SUBMODULES_KIND = "shortcut_submodules"


@dataclass(frozen=True)
class FitConfig:
    """What the states of a layer-map fit depend on (the resume key, with the model and data fingerprints).
    ``--ridge`` is not in it: it enters only the solve, so a finished pass can be solved with another."""

    train_sentences: int
    val_sentences: int
    seed: int
    raw_wikitext: bool
    batch_size: int
    shard_positions: int
    n_positions: int
    position_mode: str = "random"
    positions_per_sentence: int = 1


@dataclass(frozen=True)
class SubmodulesConfig:
    """What the points of a submodule-map fit depend on (with the model and positions fingerprints)."""

    layers: list[int]
    batch_size: int
    block: int
    n_positions: int


def positions_digest(positions: Sequence[Position]) -> str:
    """SHA-256 of the inputs and read rows of ``positions``."""
    h = hashlib.sha256()
    for p in positions:
        h.update(repr((p.input_ids, p.read_at)).encode())
    return h.hexdigest()


@dataclass
class PassPart:
    """A partial pass: the accumulator of units ``0 .. done - 1`` (None while unit 0 is not in) and the rows
    of the other units it holds, by unit."""

    acc: Any | None = None
    done: int = 0
    rows: dict[int, torch.Tensor] = field(default_factory=dict)


class PositionPass:
    """A :class:`fflayers.runs.UnitTask` of blocks of ``block`` positions (see the module docstring).
    Subclasses read a block's rows (:meth:`read`), make the accumulator (:meth:`new_acc`) and fold rows into
    it (:meth:`fold`)."""

    def __init__(self, adapter: LMAdapter, positions: Sequence[Position], block: int,
                 batch_size: int) -> None:
        self.adapter = adapter
        self.positions = list(positions)
        self.batch_size = int(batch_size)
        self.block = max(1, int(block))
        n = len(self.positions)
        self.blocks = [range(s, min(s + self.block, n)) for s in range(0, n, self.block)]
        self.n_units = len(self.blocks)

    def unit_weight(self, unit: int) -> int:
        return len(self.blocks[unit])

    def run_units(self, units: range, progress: Callable[[int], object]) -> PassPart:
        """The rows of ``units`` (CPU float32), by unit."""
        rows = {}
        for u in units:
            block = self.blocks[u]
            rows[u] = self.read(self.positions[block.start : block.stop], progress)
        return PassPart(rows=rows)

    def merge(self, parts: list[PassPart]) -> PassPart:
        """One part of all the rows; rows whose units follow the accumulated ones are folded in, in order.
        The part holding the accumulator gives it up (it is folded into in place)."""
        out = PassPart()
        for part in parts:
            if part.acc is not None:
                if out.acc is not None:
                    raise RunStateError("two partial passes both hold the first unit; merge parts of one run")
                out.acc, out.done = part.acc, part.done
            out.rows.update(part.rows)
        while out.done in out.rows:
            if out.acc is None:
                out.acc = self.new_acc()
            rows = out.rows.pop(out.done)
            for start in range(0, rows.shape[0], self.batch_size):
                self.fold(out.acc, rows[start : start + self.batch_size].contiguous())
            out.done += 1
        return out

    def to_state(self, part: PassPart) -> dict:
        units = sorted(part.rows)
        return {"done": part.done, "acc": None if part.acc is None else part.acc.state_dict(),
                "units": units, "rows": [part.rows[u] for u in units]}

    def from_state(self, state: dict) -> PassPart:
        acc = None
        if state["acc"] is not None:
            acc = self.new_acc(allocate=False)
            acc.load_state_dict(state["acc"])
        return PassPart(acc, int(state["done"]), dict(zip(state["units"], state["rows"], strict=True)))

    def result(self, part: PassPart | None) -> Any:
        """The accumulator of the whole pass; :class:`~fflayers.core.RunStateError` when units are missing."""
        if part is None or part.done != self.n_units or part.rows:
            done = 0 if part is None else part.done
            raise RunStateError(f"the pass folded {done} of {self.n_units} blocks of positions; rerun with "
                                "--resume")
        return part.acc

    def read(self, positions: Sequence[Position], progress: Callable[[int], object]) -> torch.Tensor:
        raise NotImplementedError

    def new_acc(self, allocate: bool = True) -> Any:
        raise NotImplementedError

    def fold(self, acc: Any, rows: torch.Tensor) -> None:
        raise NotImplementedError


class StatesPass(PositionPass):
    """The pass of the layer maps: the states ``[n, L+1, d]`` of the positions into a
    :class:`~fflayers.shortcuts.GramAccumulator` on the model's device."""

    def read(self, positions: Sequence[Position], progress: Callable[[int], object]) -> torch.Tensor:
        out = []
        for states in iter_state_batches(self.adapter, positions, batch_size=self.batch_size):
            out.append(states.cpu())
            progress(states.shape[0])
        return torch.cat(out)

    def new_acc(self, allocate: bool = True) -> GramAccumulator:
        a = self.adapter
        return GramAccumulator(a.n_layers + 1, a.d_model, device=a.device, allocate=allocate)

    def fold(self, acc: GramAccumulator, rows: torch.Tensor) -> None:
        acc.add(rows)


class PointsPass(PositionPass):
    """The pass of the submodule maps: the chain points of blocks ``layers`` into a
    :class:`~fflayers.shortcuts.chains.SubmoduleGram`. Blocks hold whole batches, so the batches are those of
    :func:`~fflayers.shortcuts.submodules.fit_submodule_maps`."""

    def __init__(self, adapter: LMAdapter, positions: Sequence[Position], layers: Iterable[int] | None,
                 block: int, batch_size: int) -> None:
        block = batch_size * max(1, -(-int(block) // int(batch_size)))
        super().__init__(adapter, positions, block, batch_size)
        self.layers = adapter.check_layers(layers, sort=True)
        self.keys = self.new_acc(allocate=False).points

    def read(self, positions: Sequence[Position], progress: Callable[[int], object]) -> torch.Tensor:
        out = []
        for pts in iter_submodule_points(self.adapter, positions, self.layers, self.batch_size):
            out.append(torch.stack([pts[key] for key in self.keys], dim=1).cpu())
            progress(out[-1].shape[0])
        return torch.cat(out)

    def new_acc(self, allocate: bool = True) -> SubmoduleGram:
        return SubmoduleGram(self.adapter, self.layers, allocate=allocate)

    def fold(self, acc: SubmoduleGram, rows: torch.Tensor) -> None:
        acc.add({key: rows[:, i].contiguous() for i, key in enumerate(self.keys)})


def run_pass(task: PositionPass, config: Any, kind: str, run_dir: str | os.PathLike | None,
             fingerprints: Mapping[str, str], progress: bool = True, desc: str | None = None) -> RunResult:
    """Run the pass ``task`` with :func:`fflayers.runs.run_units` (call on every rank): the resume key is
    ``config``, the model's fingerprint and ``fingerprints``; a shard is one block of positions. On rank 0,
    ``task.result(run.result)`` is the accumulator of the whole pass."""
    prints = {"model": model_fingerprint(task.adapter), **fingerprints}
    return run_units(task, config, kind=kind, run_dir=run_dir, fingerprints=prints, unit_name="positions",
                     shard_weight=task.block, progress=progress, desc=desc or kind)


def merge_rows_states(states: list[dict]) -> dict:
    """Rows states of one pass (``to_state``, without accumulators) merged: the rows of all their units."""
    rows: dict[int, torch.Tensor] = {}
    for state in states:
        if state["acc"] is not None:
            raise RunStateError("a partial pass with Gram sums cannot be merged without its model; merge the "
                                "rows of the shards")
        rows.update(zip(state["units"], state["rows"], strict=True))
    units = sorted(rows)
    return {"done": 0, "acc": None, "units": units, "rows": [rows[u] for u in units]}


register_merge(FIT_KIND, merge_rows_states)
register_merge(SUBMODULES_KIND, merge_rows_states)
