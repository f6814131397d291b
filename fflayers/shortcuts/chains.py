"""The submodule chains of a block, the points read along them, and their Gram sums.

:data:`CHAINS` lists, per block layout, the submodules of one block as steps from one point to the next (see
:mod:`fflayers.shortcuts.submodules`); :func:`iter_submodule_points` reads every point of the chosen blocks
at the read rows of a batch of positions, and :class:`SubmoduleGram` sums ``X^T X`` and ``X^T Y`` over them
in float64 (an accumulator with the state protocol of :mod:`fflayers.runs.accumulators`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.hooks import hooked
from fflayers.shortcuts.linear_maps import solve_least_squares
from fflayers.shortcuts.positions import Position
from fflayers.shortcuts.states import check_positions, collate_shared

__all__ = ["CAPTURED", "CHAINS", "Step", "SubmoduleGram", "chain", "iter_submodule_points"]

#: Points captured from the model (hook points); the rest of a chain is derived from them.
CAPTURED: tuple[str, ...] = ("resid_pre", "attn_in", "attn_out", "mlp_in", "mlp_out", "resid_post")


@dataclass(frozen=True)
class Step:
    """One submodule: ``name`` maps point ``source`` to point ``target``."""

    name: str
    source: str
    target: str


#: layout -> the submodules of one block, in order.
CHAINS: dict[str, tuple[Step, ...]] = {
    "pre_norm": (Step("ln1", "resid_pre", "attn_in"), Step("attn", "attn_in", "attn_out"),
                 Step("res1", "attn_out", "attn_res"), Step("ln2", "attn_res", "mlp_in"),
                 Step("mlp", "mlp_in", "mlp_out"), Step("res2", "mlp_out", "resid_post")),
    "post_norm": (Step("attn", "resid_pre", "attn_out"), Step("res1", "attn_out", "attn_res"),
                  Step("ln1", "attn_res", "mlp_in"), Step("mlp", "mlp_in", "mlp_out"),
                  Step("res2", "mlp_out", "mlp_res"), Step("ln2", "mlp_res", "resid_post")),
    "parallel": (Step("ln1", "resid_pre", "attn_in"), Step("attn", "attn_in", "attn_out"),
                 Step("ln2", "resid_pre", "mlp_in"), Step("mlp", "mlp_in", "mlp_out")),
}
#: the norms after the sublayers belong to attn and mlp (their outputs are what is added to the stream)
CHAINS["sandwich"] = CHAINS["pre_norm"]


def chain(adapter: LMAdapter) -> tuple[Step, ...]:
    """The submodules of one block of this model."""
    layout = adapter.block_layout
    if layout not in CHAINS:
        raise InputError(f"block layout {layout!r} has no submodule chain; known: {', '.join(CHAINS)}")
    return CHAINS[layout]


def _points(captured: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Captured points plus the derived sums ``attn_res`` and ``mlp_res``."""
    pts = dict(captured)
    pts["attn_res"] = pts["resid_pre"] + pts["attn_out"]
    pts["mlp_res"] = pts["mlp_in"] + pts["mlp_out"]
    return pts


def iter_submodule_points(
    adapter: LMAdapter, positions: Sequence[Position], layers: Iterable[int] | None = None,
    batch_size: int = 32,
):
    """Per batch of positions: ``{(layer, point): [b, d]}`` (float32) at each position's read row, for every
    point of the chain (captured and derived)."""
    check_positions(positions, batch_size)
    layers = adapter.check_layers(layers, sort=True)
    dev = adapter.device
    for start in range(0, len(positions), batch_size):
        batch = positions[start : start + batch_size]
        ids, mask, rows, read_at = (t.to(dev) for t in collate_shared(batch, adapter.vocab.pad_id))
        got: dict[tuple[int, str], torch.Tensor] = {}

        def keeper(key, got=got, rows=rows, read_at=read_at):
            def fn(x: torch.Tensor):
                got[key] = x[rows, read_at].float()
                return None

            return fn

        hooks = [(p, layer, keeper((layer, p))) for layer in layers for p in CAPTURED]
        with hooked(adapter, hooks), torch.inference_mode():
            adapter.run(ids, mask)
        out = {}
        for layer in layers:
            for p, value in _points({p: got[layer, p] for p in CAPTURED}).items():
                out[layer, p] = value
        yield out


class SubmoduleGram:
    """Running ``X^T X`` per (layer, source point) and ``X^T Y`` per (layer, submodule), float64 on
    ``device``.

    An accumulator with the state protocol of :mod:`fflayers.runs.accumulators` (``add``, ``merge``,
    ``state_dict``, ``load_state_dict``).
    """

    def __init__(self, adapter: LMAdapter, layers: Iterable[int] | None = None, device=None,
                 allocate: bool = True) -> None:
        self.layers = adapter.check_layers(layers, sort=True)
        self.steps = chain(adapter)
        self.d = adapter.d_model
        self.device = torch.device(device) if device is not None else adapter.device
        self.n = 0
        shape = (self.d, self.d) if allocate else (0, 0)  # not allocated: for load_state_dict
        z = lambda: torch.zeros(shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.gram = {(layer, s.source): z() for layer in self.layers for s in self.steps}
        self.cross = {(layer, s.name): z() for layer in self.layers for s in self.steps}

    @property
    def points(self) -> list[tuple[int, str]]:
        """The ``(layer, point)`` keys :meth:`update` reads, in a fixed order."""
        keys = [(layer, p) for layer in self.layers for s in self.steps for p in (s.source, s.target)]
        return list(dict.fromkeys(keys))

    def update(self, points: Mapping[tuple[int, str], torch.Tensor]) -> None:
        """Add one batch from :func:`iter_submodule_points`."""
        # each point once in float64 (a point is the source or target of up to three steps)
        x = {key: points[key].to(self.device, torch.float64) for key in self.points}
        for (layer, src), G in self.gram.items():
            if not torch.isfinite(x[layer, src]).all():
                raise InputError(f"layer {layer} {src} holds NaN or inf values; check the model's dtype")
            G.addmm_(x[layer, src].T, x[layer, src])
        for layer in self.layers:
            for s in self.steps:
                self.cross[layer, s.name].addmm_(x[layer, s.source].T, x[layer, s.target])
        self.n += next(iter(x.values())).shape[0]

    def fit(self, ridge: float = 0.0) -> dict[tuple[int, str], torch.Tensor]:
        """Maps ``{(layer, name): A}`` (``[d, d]`` float32, CPU), ``target ≈ A @ source``."""
        if self.n == 0:
            raise InputError("no positions accumulated; call update() first")
        out = {}
        for layer in self.layers:
            for s in self.steps:
                G = self.gram[layer, s.source]
                what = f"layer {layer} {s.source} (input of {s.name})"
                out[layer, s.name] = solve_least_squares(G, self.cross[layer, s.name], self.n, ridge, what)
        return out

    def add(self, points: Mapping[tuple[int, str], torch.Tensor]) -> None:
        """:meth:`update` (the name of the state protocol)."""
        self.update(points)

    def merge(self, other: SubmoduleGram) -> None:
        """Add the sums of ``other`` (same blocks and size). The same sums as one accumulator fed all the rows
        up to float rounding; the fits fold rows in order instead (:mod:`fflayers.shortcuts.passes`)."""
        if (other.layers, other.steps, other.d) != (self.layers, self.steps, self.d):
            raise InputError("submodule accumulators of different blocks, chains or sizes cannot be merged")
        for mine, theirs in ((self.gram, other.gram), (self.cross, other.cross)):
            for key, value in theirs.items():
                mine[key] += value.to(self.device)
        self.n += other.n

    def state_dict(self) -> dict:
        """The sums and count (the tensors themselves, on :attr:`device`: not a copy)."""
        return {"layers": list(self.layers), "d": self.d, "n": self.n,
                "gram": list(self.gram.values()), "cross": list(self.cross.values())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the sums of :meth:`state_dict` (of an accumulator of the same blocks and size)."""
        if list(state["layers"]) != list(self.layers) or int(state["d"]) != self.d or (
                len(state["gram"]), len(state["cross"])) != (len(self.gram), len(self.cross)):
            raise InputError(f"a submodule accumulator state of layers {list(state['layers'])} and d = "
                             f"{state['d']} does not fit layers {self.layers} and d = {self.d}")
        self.gram = {k: v.to(self.device, torch.float64)
                     for k, v in zip(self.gram, state["gram"], strict=True)}
        self.cross = {k: v.to(self.device, torch.float64)
                      for k, v in zip(self.cross, state["cross"], strict=True)}
        self.n = int(state["n"])
