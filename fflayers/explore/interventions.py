"""The explorer's interventions: parsed from JSON, applied with :mod:`fflayers.hooks`, written as Python.

An intervention is one of (positions are token positions of the prompt, negative ones from the end)::

    {"kind": "value", "layer": L, "dim": I, "op": "off" | "set" | "scale", "value": x, "positions": [..]}
    {"kind": "block_attention", "layers": [..], "from": [-1], "to": [..]}
    {"kind": "zero_sublayer", "sublayer": "attn" | "mlp", "layers": [..]}

A value edit acts on the FFN coefficient ``m_i`` (hook point ``mlp_coef``); zeroing a sublayer zeroes its
output (``attn_out`` / ``mlp_out``); blocked edges go through :func:`fflayers.hooks.block_attention`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.hooks import Edit, block_attention, intervene, replace, scale

__all__ = ["KINDS", "MAX_INTERVENTIONS", "Intervention", "RequestError", "applied", "edge_masks", "edits_of",
           "interventions_json", "parse_interventions", "python_snippet"]

KINDS = ("value", "block_attention", "zero_sublayer")
VALUE_OPS = ("off", "set", "scale")
SUBLAYERS = {"attn": "attn_out", "mlp": "mlp_out"}
#: the most interventions one request may carry
MAX_INTERVENTIONS = 64


class RequestError(InputError):
    """Bad input of a request: ``status`` is the HTTP status the server answers with (400 malformed, 413 too
    large, 422 out of range)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Intervention:
    """One parsed intervention; positions are absolute (resolved against the prompt's length)."""

    kind: str
    layers: tuple[int, ...]
    dim: int | None = None
    op: str | None = None
    value: float | None = None
    positions: tuple[int, ...] | None = None
    sources: tuple[int, ...] = ()
    sublayer: str | None = None

    def to_json(self) -> dict:
        """The JSON form (positions absolute)."""
        if self.kind == "value":
            out = {"kind": "value", "layer": self.layers[0], "dim": self.dim, "op": self.op}
            if self.op != "off":
                out["value"] = self.value
            out["positions"] = None if self.positions is None else list(self.positions)
            return out
        if self.kind == "block_attention":
            return {"kind": "block_attention", "layers": list(self.layers),
                    "from": list(self.positions or ()), "to": list(self.sources)}
        return {"kind": "zero_sublayer", "sublayer": self.sublayer, "layers": list(self.layers)}


# ----- parsing -------------------------------------------------------------------------------------------


def _int(item: dict, name: str, n: int, what: str) -> int:
    v = item.get(name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"intervention field {name!r} must be an integer, got {v!r}", 400)
    if not 0 <= v < n:
        raise RequestError(f"{what} {v} out of range: the model has {n} (0..{n - 1})")
    return v


def _layers(item: dict, n_layers: int) -> tuple[int, ...]:
    layers = item.get("layers")
    if not isinstance(layers, list) or not layers:
        raise RequestError("intervention field 'layers' must be a non-empty list of layer indices", 400)
    return tuple(sorted({_int({"layer": x}, "layer", n_layers, "layer") for x in layers}))


def _positions(values: object, n_tokens: int, name: str) -> tuple[int, ...]:
    if not isinstance(values, list) or not values:
        raise RequestError(f"intervention field {name!r} must be a non-empty list of token positions", 400)
    out = []
    for p in values:
        if isinstance(p, bool) or not isinstance(p, int):
            raise RequestError(f"position {p!r} in {name!r} is not an integer", 400)
        if not -n_tokens <= p < n_tokens:
            raise RequestError(f"position {p} out of range for a prompt of {n_tokens} tokens "
                               f"({-n_tokens}..{n_tokens - 1})")
        out.append(p % n_tokens)
    return tuple(sorted(set(out)))


def _parse_one(item: object, adapter: LMAdapter, n_tokens: int) -> Intervention:
    if not isinstance(item, dict):
        raise RequestError(f"an intervention must be a JSON object, got {item!r}", 400)
    kind = item.get("kind")
    if kind == "value":
        layer = _int(item, "layer", adapter.n_layers, "layer")
        dim = _int(item, "dim", adapter.d_ff, "value dim")
        op = item.get("op", "off")
        if op not in VALUE_OPS:
            raise RequestError(f"value op {op!r} unknown; choose from {', '.join(VALUE_OPS)}", 400)
        value = None
        if op != "off":
            value = item.get("value")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise RequestError(f"value op {op!r} needs a number 'value', got {value!r}", 400)
            value = float(value)
        raw = item.get("positions")
        positions = None if raw is None else _positions(raw, n_tokens, "positions")
        return Intervention("value", (layer,), dim=dim, op=op, value=value, positions=positions)
    if kind == "block_attention":
        return Intervention("block_attention", _layers(item, adapter.n_layers),
                            positions=_positions(item.get("from", [-1]), n_tokens, "from"),
                            sources=_positions(item.get("to"), n_tokens, "to"))
    if kind == "zero_sublayer":
        sub = item.get("sublayer")
        if sub not in SUBLAYERS:
            raise RequestError(f"sublayer {sub!r} unknown; choose 'attn' or 'mlp'", 400)
        return Intervention("zero_sublayer", _layers(item, adapter.n_layers), sublayer=sub)
    raise RequestError(f"intervention kind {kind!r} unknown; choose from {', '.join(KINDS)}", 400)


def parse_interventions(items: object, adapter: LMAdapter, n_tokens: int) -> list[Intervention]:
    """Parse and check a JSON list of interventions for a prompt of ``n_tokens`` tokens."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise RequestError("'interventions' must be a list", 400)
    if len(items) > MAX_INTERVENTIONS:
        raise RequestError(f"{len(items)} interventions; at most {MAX_INTERVENTIONS} per request", 413)
    return [_parse_one(item, adapter, n_tokens) for item in items]


# ----- applying ------------------------------------------------------------------------------------------


def edits_of(interventions: Sequence[Intervention]) -> list[Edit]:
    """The hook edits of the value and sublayer interventions."""
    edits = []
    for iv in interventions:
        if iv.kind == "value":
            pos = None if iv.positions is None else list(iv.positions)
            if iv.op == "scale":
                edits.append(scale("mlp_coef", iv.layers[0], iv.value, positions=pos, index=[iv.dim]))
            else:
                value = 0.0 if iv.op == "off" else iv.value
                edits.append(replace("mlp_coef", iv.layers[0], value, positions=pos, index=[iv.dim]))
        elif iv.kind == "zero_sublayer":
            edits.extend(scale(SUBLAYERS[iv.sublayer], layer, 0.0) for layer in iv.layers)
    return edits


def edge_masks(interventions: Sequence[Intervention], n_tokens: int) -> dict[int, torch.Tensor]:
    """``{layer: [T, T] bool}`` of the blocked attention edges (True = query may not read key)."""
    masks: dict[int, torch.Tensor] = {}
    for iv in interventions:
        if iv.kind != "block_attention":
            continue
        for layer in iv.layers:
            mask = masks.setdefault(layer, torch.zeros(n_tokens, n_tokens, dtype=torch.bool))
            for q in iv.positions or ():
                mask[q, list(iv.sources)] = True
    return masks


@contextmanager
def applied(adapter: LMAdapter, interventions: Sequence[Intervention], n_tokens: int) -> Iterator[None]:
    """Apply the interventions to the forward passes in the body, for sequences of ``n_tokens`` tokens."""
    with ExitStack() as stack:
        edits = edits_of(interventions)
        if edits:
            stack.enter_context(intervene(adapter, edits))
        masks = edge_masks(interventions, n_tokens)
        if masks:
            stack.enter_context(block_attention(adapter, masks))
        yield


# ----- export --------------------------------------------------------------------------------------------


def python_snippet(prompt: str, interventions: Sequence[Intervention], load_code: str) -> str:
    """A script that reproduces the edited prediction with :mod:`fflayers.hooks`; ``load_code`` is the line
    that loads the model into ``adapter``."""
    lines = ["import torch", "", "from fflayers.hooks import block_attention, intervene, replace, scale", ""]
    lines += [load_code, f"prompt = {prompt!r}", "ids = torch.tensor([adapter.vocab.tokenize(prompt)])",
              "T = ids.shape[1]", "edits = ["]
    for edit in _edit_calls(interventions):
        lines.append(f"    {edit},")
    lines.append("]")
    blocking = any(iv.kind == "block_attention" for iv in interventions)
    if blocking:
        lines.append("blocked = {}  # layer -> [T, T] bool: True = query position may not read key position")
    for iv in interventions:
        if iv.kind == "block_attention":
            lines.append(f"for layer in {list(iv.layers)}:")
            lines.append("    mask = blocked.setdefault(layer, torch.zeros(T, T, dtype=torch.bool))")
            lines.append(f"    for q in {list(iv.positions or ())}:")
            lines.append(f"        mask[q, {list(iv.sources)}] = True")
    edges = ", block_attention(adapter, blocked)" if blocking else ""
    lines += [f"with torch.no_grad(), intervene(adapter, edits){edges}:",
              "    lp = adapter.log_probs(ids)[0, -1]", "top = lp.topk(10)",
              "for i, p in zip(top.indices.tolist(), top.values.exp().tolist()):",
              "    print(repr(adapter.vocab.id_to_token([i])[0]), round(p, 4))", ""]
    return "\n".join(lines)


def _edit_calls(interventions: Sequence[Intervention]) -> Iterator[str]:
    for iv in interventions:
        if iv.kind == "value":
            pos = "None" if iv.positions is None else repr(list(iv.positions))
            if iv.op == "scale":
                yield f"scale('mlp_coef', {iv.layers[0]}, {iv.value!r}, positions={pos}, index=[{iv.dim}])"
            else:
                value = 0.0 if iv.op == "off" else iv.value
                yield f"replace('mlp_coef', {iv.layers[0]}, {value!r}, positions={pos}, index=[{iv.dim}])"
        elif iv.kind == "zero_sublayer":
            for layer in iv.layers:
                yield f"scale({SUBLAYERS[iv.sublayer]!r}, {layer}, 0.0)"


def interventions_json(interventions: Sequence[Intervention]) -> str:
    """The interventions as pretty JSON."""
    return json.dumps([iv.to_json() for iv in interventions], indent=2)
