"""Linear maps of the submodules inside each block, and shortcuts that run the model with one kind replaced.

Each block is a chain of points (:data:`CHAINS`, by :attr:`LMAdapter.block_layout`); a submodule maps one
point to the next. Pre-norm blocks (GPT-2, GPT-Neo, Llama, fairseq ``normalize_before``)::

    resid_pre -ln1-> attn_in -attn-> attn_out -res1-> attn_res -ln2-> mlp_in -mlp-> mlp_out -res2-> resid_post

with ``attn_res = resid_pre + attn_out``. Post-norm blocks (BERT, fairseq's default)::

    resid_pre -attn-> attn_out -res1-> attn_res -ln1-> mlp_in -mlp-> mlp_out -res2-> mlp_res -ln2-> resid_post

with ``mlp_res = mlp_in + mlp_out``. Parallel blocks (GPT-J, GPT-NeoX) read both sublayers from the block
input, ``resid_post = resid_pre + attn_out + mlp_out``::

    resid_pre -ln1-> attn_in -attn-> attn_out        resid_pre -ln2-> mlp_in -mlp-> mlp_out

(GPT-J's one norm feeds both: its ``ln1`` and ``ln2`` maps are fitted separately and agree.) A residual step
("+res") is fitted as a map from the sublayer output alone, as the method defines it; its r^2 shows how much
the stream it adds to matters.

The three submodule shortcuts from state ``l`` (the input of block ``l``) run blocks ``l .. L-1`` of the real
model with, at the read position only, one kind of submodule replaced by its linear map of its real input:
``mat_attn`` (attention), ``mat_ffn`` (the MLP), ``mat_ln1_ln2`` (both norms; pre-norm and parallel blocks:
a post-norm block's norm output is also the residual stream, which a hook on the sublayer input cannot
replace). Other positions run unchanged, so attention still reads the real context.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.hooks import hooked
from fflayers.shortcuts.chains import CAPTURED, CHAINS, Step, SubmoduleGram, chain, iter_submodule_points
from fflayers.shortcuts.evaluate import precision_table
from fflayers.shortcuts.linear_maps import read_safetensors, sorted_metadata
from fflayers.shortcuts.positions import Position
from fflayers.shortcuts.r2 import r2_from_sums
from fflayers.shortcuts.states import check_positions, collate_positions

__all__ = ["CAPTURED", "CHAINS", "SUBMODULE_MAPPINGS", "Step", "SubMaps", "SubmoduleGram", "chain",
           "check_submodule_mappings", "evaluate_submodule_shortcuts", "fit_submodule_maps",
           "iter_submodule_points", "load_submodule_maps", "save_submodule_maps", "submodule_log_probs",
           "submodule_r2"]

#: Submodule shortcuts -> the submodules they replace.
SUBMODULE_MAPPINGS: dict[str, tuple[str, ...]] = {"mat_attn": ("attn",), "mat_ffn": ("mlp",),
                                                  "mat_ln1_ln2": ("ln1", "ln2")}

#: Key of a submodule map: (layer, submodule name).
SubMaps = Mapping[tuple[int, str], torch.Tensor]


def fit_submodule_maps(
    adapter: LMAdapter,
    positions: Sequence[Position],
    layers: Iterable[int] | None = None,
    batch_size: int = 32,
    ridge: float = 0.0,
    progress: bool = False,
) -> dict[tuple[int, str], torch.Tensor]:
    """Least-squares maps (no intercept) of every submodule of the chosen blocks, from one pass over
    ``positions``: ``{(layer, name): A}`` with ``target ≈ A @ source`` (see :data:`CHAINS`)."""
    from tqdm.auto import tqdm

    acc = SubmoduleGram(adapter, layers)
    with tqdm(total=len(positions), unit="pos", desc="submodule maps", disable=not progress) as bar:
        for pts in iter_submodule_points(adapter, positions, acc.layers, batch_size):
            acc.update(pts)
            bar.update(next(iter(pts.values())).shape[0])
    return acc.fit(ridge)


def submodule_r2(
    adapter: LMAdapter, positions: Sequence[Position], maps: SubMaps, batch_size: int = 32
) -> pd.DataFrame:
    """r^2 (``sklearn.metrics.r2_score``, uniform average over coordinates) of each submodule map (``mat``)
    and of the identity (``id``) on ``positions``: rows ``layer, submodule, source, target, mapping, r2``."""
    steps = chain(adapter)
    layers = sorted({layer for layer, _ in maps})
    if not layers:
        raise InputError("no submodule maps to score; fit them first (fit_submodule_maps)")
    missing = [(layer, s.name) for layer in layers for s in steps if (layer, s.name) not in maps]
    if missing:
        raise InputError(f"no submodule map for layer {missing[0][0]} {missing[0][1]}; "
                         "refit the submodule maps")
    d = adapter.d_model
    z = lambda: torch.zeros(d, dtype=torch.float64)  # noqa: E731
    sums = {(layer, s.name): {"y": z(), "y2": z(), "mat": z(), "id": z()} for layer in layers for s in steps}
    n = 0
    for pts in iter_submodule_points(adapter, positions, layers, batch_size):
        for layer in layers:
            for s in steps:
                x, y = pts[layer, s.source].double().cpu(), pts[layer, s.target].double().cpu()
                acc = sums[layer, s.name]
                acc["y"] += y.sum(0)
                acc["y2"] += y.square().sum(0)
                acc["mat"] += (y - x @ maps[layer, s.name].double().T).square().sum(0)
                acc["id"] += (y - x).square().sum(0)
        n += next(iter(pts.values())).shape[0]
    if n < 2:
        raise InputError(f"r^2 needs at least 2 positions, got {n}")
    rows = []
    for layer in layers:
        for s in steps:
            acc = sums[layer, s.name]
            total = (acc["y2"] - acc["y"].square() / n).clamp_min(0)
            for mapping in ("id", "mat"):
                rows.append((layer, s.name, s.source, s.target, mapping, r2_from_sums(acc[mapping], total)))
    return pd.DataFrame(rows, columns=["layer", "submodule", "source", "target", "mapping", "r2"])


# ----- shortcuts with replaced submodules -------------------------------------------------------------------


def check_submodule_mappings(adapter: LMAdapter, mappings: Iterable[str]) -> tuple[str, ...]:
    """Known names, each possible for this model's block layout."""
    names = tuple(dict.fromkeys(mappings))
    for m in names:
        if m not in SUBMODULE_MAPPINGS:
            raise InputError(f"unknown submodule mapping {m!r}; choose from {', '.join(SUBMODULE_MAPPINGS)}")
        if m == "mat_ln1_ln2" and adapter.block_layout == "post_norm":
            raise InputError("mat_ln1_ln2 needs pre-norm or parallel blocks: in a post-norm block the norm's "
                               "output is the residual stream itself; use mat_attn and mat_ffn")
    return names


def _replacement_hooks(adapter: LMAdapter, maps: SubMaps, first: int, replaced: tuple[str, ...],
                       rows: torch.Tensor, read_at: torch.Tensor) -> list[tuple[str, int, Callable]]:
    """Hooks for blocks ``first .. L-1``: at row ``read_at[r]`` of sequence ``r``, each replaced submodule's
    output becomes its map applied to its real input in this pass."""
    layout = adapter.block_layout
    hooks: list[tuple[str, int, Callable]] = []
    for layer in range(first, adapter.n_layers):
        seen: dict[str, torch.Tensor] = {}

        def saver(point, seen=seen):
            def fn(x):
                seen[point] = x[rows, read_at]
                return None

            return fn

        def setter(name, source_fn, seen=seen, layer=layer):
            A = maps[layer, name]

            def fn(x):
                new = x.clone()
                src = source_fn(seen)
                new[rows, read_at] = (src.float() @ A.to(x.device).T).to(x.dtype)
                return new

            return fn

        hooks.append(("resid_pre", layer, saver("resid_pre")))
        if "attn" in replaced:
            hooks.append(("attn_in", layer, saver("attn_in")))
            hooks.append(("attn_out", layer, setter("attn", lambda s: s["attn_in"])))
        else:
            hooks.append(("attn_out", layer, saver("attn_out")))
        if "ln1" in replaced:
            hooks.append(("attn_in", layer, setter("ln1", lambda s: s["resid_pre"])))
        if "ln2" in replaced:
            src = ((lambda s: s["resid_pre"]) if layout == "parallel"
                   else (lambda s: s["resid_pre"] + s["attn_out"]))
            hooks.append(("mlp_in", layer, setter("ln2", src)))
        if "mlp" in replaced:
            hooks.append(("mlp_in", layer, saver("mlp_in")))
            hooks.append(("mlp_out", layer, setter("mlp", lambda s: s["mlp_in"])))
    return hooks


def submodule_log_probs(
    adapter: LMAdapter, positions: Sequence[Position], maps: SubMaps, layer: int, mapping: str
) -> torch.Tensor:
    """Log-probs ``[n, V]`` at the read rows of one batch of positions, with blocks ``layer .. L-1`` running
    ``mapping``'s submodules replaced by their maps at those rows."""
    replaced = _replaced(adapter, maps, layer, mapping)
    dev = adapter.device
    ids, mask, read_at = (t.to(dev) for t in collate_positions(positions, adapter.vocab.pad_id))
    return _replaced_log_probs(adapter, maps, layer, replaced, ids, mask, read_at)


def _replaced(adapter: LMAdapter, maps: SubMaps, layer: int, mapping: str) -> tuple[str, ...]:
    """The submodules ``mapping`` replaces; :class:`~fflayers.core.InputError` when a map of blocks
    ``layer..L-1`` is missing."""
    (mapping,) = check_submodule_mappings(adapter, [mapping])
    replaced = SUBMODULE_MAPPINGS[mapping]
    for b in range(layer, adapter.n_layers):
        for name in replaced:
            if (b, name) not in maps:
                raise InputError(
                    f"no submodule map for layer {b} {name}; fit the submodule maps of layers {layer}..")
    return replaced


def _replaced_log_probs(adapter: LMAdapter, maps: SubMaps, layer: int, replaced: tuple[str, ...],
                        ids: torch.Tensor, mask: torch.Tensor, read_at: torch.Tensor) -> torch.Tensor:
    """Log-probs at the read rows of a collated batch (on the adapter's device) with ``replaced`` swapped."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    with hooked(adapter,
                _replacement_hooks(adapter, maps, layer, replaced, rows, read_at)), torch.inference_mode():
        lp = adapter.log_probs(ids, mask)
    return lp[rows, read_at]


def evaluate_submodule_shortcuts(
    adapter: LMAdapter,
    positions: Sequence[Position],
    maps: SubMaps,
    mappings: Iterable[str] = tuple(SUBMODULE_MAPPINGS),
    layers: Iterable[int] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
    progress: bool = False,
) -> pd.DataFrame:
    """Precision@k and surprisal (bits) of the submodule shortcuts from each state ``layer`` (rows
    ``layer, mapping, precision@k..., surprisal``), as :func:`fflayers.shortcuts.evaluate_shortcuts` scores
    ``id`` and ``mat``: the shortcut's top-1 against the model's own final distribution."""
    from tqdm.auto import tqdm

    names = check_submodule_mappings(adapter, mappings)
    layers = adapter.check_layers(layers, sort=True)
    ks = sorted(set(ks))
    if not ks or ks[0] < 1 or ks[-1] > adapter.vocab_size:
        raise InputError(f"ks must be between 1 and the vocabulary size {adapter.vocab_size}, got {ks}")
    check_positions(positions, batch_size)
    replaced = {(layer, m): _replaced(adapter, maps, layer, m) for layer in layers for m in names}
    hits = torch.zeros(len(layers), len(names), len(ks), dtype=torch.float64)
    bits = torch.zeros(len(layers), len(names), dtype=torch.float64)
    bar = tqdm(total=len(positions) * len(layers) * len(names), desc="submodule shortcuts",
               disable=not progress)
    for start in range(0, len(positions), batch_size):
        batch = positions[start : start + batch_size]
        ids, mask, read_at = (t.to(adapter.device) for t in collate_positions(batch, adapter.vocab.pad_id))
        with torch.inference_mode():
            final = adapter.log_probs(ids, mask)[torch.arange(len(batch), device=ids.device), read_at]
        top_k = final.topk(ks[-1], dim=-1).indices
        for li, layer in enumerate(layers):
            for mi, m in enumerate(names):
                top1 = _replaced_log_probs(adapter, maps, layer, replaced[layer, m], ids, mask,
                                           read_at).argmax(-1)
                inside = top_k == top1[:, None]
                for col, k in enumerate(ks):
                    hits[li, mi, col] += float(inside[:, :k].any(-1).sum())
                bits[li, mi] += float((-final.gather(1, top1[:, None]).double() / math.log(2)).sum())
                bar.update(len(batch))
    bar.close()
    return precision_table(layers, names, ks, hits, bits, len(positions))


# ----- files ------------------------------------------------------------------------------------------------


def save_submodule_maps(path: str | os.PathLike, maps: SubMaps, metadata: Mapping[str, str]) -> None:
    """Write maps as safetensors ``S_{layer}_{name}`` ``[d, d]`` with string metadata (atomically)."""
    from safetensors.torch import save

    from fflayers.io import atomic_write

    if not maps:
        raise InputError("no submodule maps to save; fit them first (fit_submodule_maps)")
    tensors = {f"S_{int(layer)}_{name}": A.detach().to("cpu", torch.float32).contiguous()
               for (layer, name), A in maps.items()}
    with atomic_write(path, "wb") as f:
        f.write(sorted_metadata(save(tensors, metadata={str(k): str(v) for k, v in metadata.items()})))


def load_submodule_maps(path: str | os.PathLike,
                        adapter: LMAdapter | None = None) -> tuple[dict, dict[str, str]]:
    """Maps and metadata written by :func:`save_submodule_maps`; with ``adapter``, checks the model and
    size."""
    from fflayers.shortcuts.linear_maps import model_id

    path = Path(path)
    tensors, meta = read_safetensors(path, "submodule maps file", "run the submodules step first")
    maps = {}
    for key, A in tensors.items():
        _, layer, name = key.split("_", 2)
        maps[int(layer), name] = A
    if adapter is not None:
        if meta.get("model") not in (None, model_id(adapter)):
            raise InputError(f"{path} was fitted for {meta.get('model')}, not this model; "
                             "refit the submodule maps")
        d = {tuple(A.shape) for A in maps.values()}
        if d != {(adapter.d_model, adapter.d_model)}:
            raise InputError(f"{path} holds maps of shape {sorted(d)}, the model has d = {adapter.d_model}")
    return maps, meta
