"""Read and edit activations at named hook points, and block attention edges.

Every context manager here removes what it installed on exit, also when the body raises.

>>> with capture(adapter, ["mlp_coef"], layers=[3]) as cache:
...     adapter.run(ids, mask)
>>> cache["mlp_coef", 3].shape          # [batch, positions, d_ff]

>>> with intervene(adapter, [scale("mlp_coef", 3, 0.0, index=[17])]):   # switch neuron 17 off
...     lp = adapter.log_probs(ids, mask)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import HOOK_POINTS, HookSite, ModelError, StopForward

#: Attribute set on an attention module while some of its edges are blocked.
EDGE_ATTR = "_fflayers_blocked_edges"

Positions = None | int | Sequence[int] | torch.Tensor
Index = None | int | Sequence[int] | torch.Tensor


class ActivationCache(dict):
    """Captured activations keyed by ``(point, layer)``, each ``[batch, positions, features]``."""

    def stack(self, point: str, layers: Iterable[int]) -> torch.Tensor:
        """``[len(layers), batch, positions, features]`` for one hook point."""
        return torch.stack([self[point, layer] for layer in layers])


# ----- low-level hook installation --------------------------------------------------------------------------


def _check_point(point: str) -> None:
    if point not in HOOK_POINTS:
        raise ModelError(f"unknown hook point {point!r}; choose from {', '.join(HOOK_POINTS)}")


def site_of(adapter: LMAdapter, point: str, layer: int) -> HookSite:
    """The module and side carrying ``point`` in block ``layer``; for an adapter without its own ``mlp_in``
    site, ``mlp_in`` is the input of ``mlp_key``'s module."""
    _check_point(point)
    layer = adapter.check_layer(layer)
    if point == "mlp_in":
        try:
            return adapter.hook_site(point, layer)
        except ModelError:
            key = adapter.hook_site("mlp_key", layer)
            return HookSite(key.module, "input", key.time_first, "input")
    return adapter.hook_site(point, layer)


def _on_slice(fn: Callable[[torch.Tensor], torch.Tensor | None], start: int,
              stop: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """``fn`` applied to features ``start:stop`` of the last axis; its replacement put back in that slice."""

    def sliced(x: torch.Tensor) -> torch.Tensor | None:
        new = fn(x[..., start:stop])
        return None if new is None else torch.cat([x[..., :start], new, x[..., stop:]], dim=-1)

    return sliced


def _install(site: HookSite, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Hook ``fn`` (batch-first tensor -> replacement or None) onto a site; returns the handle."""

    def to_bf(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1) if site.time_first else x

    if site.features is not None:  # the point is a slice of the last axis: fn sees and replaces that slice
        fn = _on_slice(fn, *site.features)

    if site.side == "input":

        def pre_hook(module, args, kwargs):
            if args:
                x = args[0]
            elif site.arg_name in kwargs:
                x = kwargs[site.arg_name]
            else:
                raise ModelError(f"cannot find the input of {type(module).__name__} to hook")
            new = fn(to_bf(x))
            if new is None:
                return None
            new = to_bf(new)
            # every argument that is the hooked tensor itself gets the replacement (fairseq's attention takes
            # the same tensor as query, key and value)
            args = tuple(new if a is x else a for a in args)
            kwargs = {k: new if v is x else v for k, v in kwargs.items()}
            return args, kwargs

        return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    if site.side == "output":

        def post_hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            new = fn(to_bf(x))
            if new is None:
                return None
            new = to_bf(new)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return site.module.register_forward_hook(post_hook)

    raise ModelError(f"bad hook side {site.side!r}")


@contextmanager
def hooked(adapter: LMAdapter,
           hooks: Iterable[tuple[str, int, Callable[[torch.Tensor], torch.Tensor | None]]]):
    """Install raw hooks ``(point, layer, fn)``; ``fn`` gets the batch-first tensor, returns a replacement or
    None."""
    handles = []
    try:
        for point, layer, fn in hooks:
            handles.append(_install(site_of(adapter, point, layer), fn))
        yield
    finally:
        for h in handles:
            h.remove()


# ----- capture -------------------------------------------------------------------------------------------


@contextmanager
def capture(
    adapter: LMAdapter,
    points: str | Iterable[str],
    layers: Iterable[int] | None = None,
    *,
    detach: bool = True,
    stop_early: bool = False,
    to_cpu: bool = False,
) -> Iterator[ActivationCache]:
    """Capture hook points of the chosen layers (default: all) during the forward passes in the body.

    ``stop_early`` ends each pass right after the last requested layer (``adapter.run`` then returns None).
    ``detach=False`` keeps the autograd graph (for gradients with respect to captured values).
    Each pass overwrites the previous one's entries.
    """
    points = [points] if isinstance(points, str) else list(points)
    layers = (list(range(adapter.n_layers)) if layers is None
              else [adapter.check_layer(layer) for layer in layers])
    cache = ActivationCache()

    def saver(key):
        def fn(x: torch.Tensor):
            y = x.detach() if detach else x
            cache[key] = y.to("cpu") if to_cpu else y
            return None

        return fn

    hooks = [(p, layer, saver((p, layer))) for p in points for layer in layers]
    if stop_early and layers:

        def stop(_x):
            raise StopForward

        # registered after the savers of the same site, so a captured resid_post is saved before stopping
        hooks.append(("resid_post", max(layers), stop))
    with hooked(adapter, hooks):
        yield cache


# ----- edits ----------------------------------------------------------------------------------------------


@dataclass
class Edit:
    """An edit of hook point ``point`` in block ``layer``: ``fn`` maps the batch-first tensor to its
    replacement."""

    point: str
    layer: int
    fn: Callable[[torch.Tensor], torch.Tensor]


def _position_mask(x: torch.Tensor, positions: Positions) -> torch.Tensor | None:
    """Bool ``[B, T, 1]`` selecting positions, or None for all."""
    if positions is None:
        return None
    B, T = x.shape[0], x.shape[1]
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.shape != (B, T):
            raise ModelError(f"position mask has shape {tuple(positions.shape)}, expected {(B, T)}")
        return positions.to(x.device)[..., None]
    pos = torch.as_tensor(positions, device=x.device).long()
    mask = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    if pos.dim() == 0:
        pos = pos[None]
    if (pos >= T).any() or (pos < -T).any():
        raise ModelError(f"position out of range for a sequence of {T} tokens")
    mask[:, pos % T] = True
    return mask[..., None]


def _apply(x: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor], positions: Positions, index: Index):
    if index is None:
        y = op(x)
    else:
        idx = torch.as_tensor(index, device=x.device).long().reshape(-1)
        y = x.clone()
        y[..., idx] = op(x[..., idx])
    mask = _position_mask(x, positions)
    return y if mask is None else torch.where(mask, y, x)


def replace(point: str, layer: int, value: torch.Tensor | float, positions: Positions = None,
            index: Index = None) -> Edit:
    """Set the selected entries to ``value`` (broadcast against the selection)."""
    return Edit(point, layer, lambda x: _apply(
        x, lambda s: torch.as_tensor(value, dtype=s.dtype, device=s.device).expand_as(s), positions, index))


def scale(point: str, layer: int, factor: torch.Tensor | float, positions: Positions = None,
          index: Index = None) -> Edit:
    """Multiply the selected entries by ``factor`` (0 switches neurons off, 2 doubles them)."""
    return Edit(point, layer,
                lambda x: _apply(x, lambda s: s * torch.as_tensor(factor, dtype=s.dtype, device=s.device),
                                 positions, index))


def add(point: str, layer: int, delta: torch.Tensor | float, positions: Positions = None,
        index: Index = None) -> Edit:
    """Add ``delta`` to the selected entries."""
    return Edit(point, layer,
                lambda x: _apply(x, lambda s: s + torch.as_tensor(delta, dtype=s.dtype, device=s.device),
                                 positions, index))


@contextmanager
def intervene(adapter: LMAdapter, edits: Iterable[Edit]):
    """Apply edits during the forward passes in the body; gradients flow through them."""
    with hooked(adapter, [(e.point, e.layer, e.fn) for e in edits]):
        yield


# ----- attention edges ------------------------------------------------------------------------------------


@contextmanager
def block_attention(adapter: LMAdapter, blocked: Mapping[int, torch.Tensor]):
    """Block attention edges: ``{layer: mask}`` with mask ``[T, S]`` or ``[B, T, S]``, True = query t may not
    read key s. A row with every edge blocked gets a zero attention output (the output projection's bias,
    where the model has one, is still added)."""
    modules = []
    try:
        adapter.prepare_edge_blocking()
        for layer, mask in blocked.items():
            module = adapter.attention_module(adapter.check_layer(layer))
            mask = torch.as_tensor(mask, device=adapter.device).bool()
            if mask.dim() not in (2, 3):
                raise ModelError(f"edge mask for layer {layer} must be [T, S] or [B, T, S], "
                                 f"got {tuple(mask.shape)}")
            setattr(module, EDGE_ATTR, mask)
            modules.append(module)
        yield
    finally:
        for module in modules:
            if hasattr(module, EDGE_ATTR):
                delattr(module, EDGE_ATTR)


def blocked_edges(module: torch.nn.Module) -> torch.Tensor | None:
    """The edge mask set on an attention module by :func:`block_attention`, or None."""
    return getattr(module, EDGE_ATTR, None)


def attention_with_blocked_edges(
    scores: torch.Tensor, allowed: torch.Tensor, blocked: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """Attention output ``[B, H, T, Dv]`` from raw scores ``[B, H, T, S]``, the model's own allowed-edge mask
    (bool, broadcastable to the scores: causal and padding) and the blocked-edge mask (``[T, S]`` or
    ``[B, T, S]``). Rows with no edge left get zero output instead of a uniform average."""
    T, S = scores.shape[-2], scores.shape[-1]
    if blocked.shape[-2:] != (T, S):
        raise ModelError(f"edge mask is {tuple(blocked.shape[-2:])} but attention is {T} x {S}")
    blk = blocked[:, None] if blocked.dim() == 3 else blocked[None, None]
    keep = allowed & ~blk
    scores = scores.float().masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(keep.any(-1, keepdim=True), probs, torch.zeros_like(probs)).to(value.dtype)
    return probs @ value
