"""Lenses: ways of reading a residual-stream state of an intermediate layer as a next-token distribution.

States follow :mod:`fflayers.shortcuts`: state 0 is the stream entering block 0, state ``l`` (1..L) the output
of block ``l - 1``, before the final norm; state L is what the model's own head reads. Every lens maps a
state of layer ``l`` to log-probabilities over the vocabulary; most do it by translating it into a state of
layer L (:meth:`VectorLens.transform`) and applying the model's final norm and head.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError, ModelError
from fflayers.hooks import capture

__all__ = ["Lens", "LinearShortcutLens", "LogitLens", "VectorLens", "check_lens_layer", "sequence_states"]


def check_lens_layer(adapter: LMAdapter, layer: int) -> int:
    """``layer`` as a state index 0..L, or a one-line :class:`~fflayers.core.InputError`."""
    L = adapter.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= L:
        raise InputError(f"lens layer {layer!r} out of range: states are 0..{L} for a {L}-layer model")
    return layer


class Lens(ABC):
    """A reading of layer-``l`` states: :meth:`log_probs` ``[..., d] -> [..., V]``."""

    #: short name used in tables and figures
    name: str = "lens"

    def __init__(self, adapter: LMAdapter) -> None:
        if adapter.is_masked_lm:
            raise ModelError("lenses read next-token predictions: this is a masked LM, use a causal LM")
        self.adapter = adapter

    @abstractmethod
    def log_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Log-probabilities over the vocabulary of states ``h`` ``[..., d]`` of state index ``layer``."""


class VectorLens(Lens):
    """A lens that translates a state into a final-layer state, then reads it with the model's own head."""

    @abstractmethod
    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The final-layer stream vector (before the final norm) that the state ``h`` of ``layer`` maps to."""

    def log_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.adapter.project(self.transform(h, layer)).float()


class LogitLens(VectorLens):
    """The model's final norm and head on the state itself (nothing learned)."""

    name = "logit"

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        check_lens_layer(self.adapter, layer)
        return h


class LinearShortcutLens(VectorLens):
    """``mat``: the least-squares map ``A_{L,l}`` of :mod:`fflayers.shortcuts` (key ``(L, l)``), plus an
    optional bias per layer (``biases``: layer -> ``[d]``); the final layer is the identity."""

    name = "mat"

    def __init__(self, adapter: LMAdapter, maps: Mapping[tuple[int, int], torch.Tensor],
                 biases: Mapping[int, torch.Tensor] | None = None) -> None:
        super().__init__(adapter)
        L, d = adapter.n_layers, adapter.d_model
        self.maps: dict[int, torch.Tensor] = {}
        for (target, source), A in maps.items():
            if target != L:
                continue
            if tuple(A.shape) != (d, d):
                raise InputError(f"shortcut map ({target}, {source}) is {tuple(A.shape)}, expected {(d, d)}: "
                                 "maps fitted for another model")
            self.maps[source] = A.float()
        self.biases = {layer: b.float() for layer, b in (biases or {}).items()}

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        L = self.adapter.n_layers
        check_lens_layer(self.adapter, layer)
        if layer == L:
            return h
        if layer not in self.maps:
            raise InputError(f"no shortcut map from layer {layer} to the last layer {L}; fit maps ({L}, "
                             f"{layer}) first (fflayers shortcuts fit)")
        A = self.maps[layer].to(h.device)
        out = h.float() @ A.T
        if layer in self.biases:
            out = out + self.biases[layer].to(h.device)
        return out


#: ``--dtype`` names -> the autocast dtype of the model's forward (None: the model's own)
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sequence_states(adapter: LMAdapter, ids: torch.Tensor, mask: torch.Tensor,
                    dtype: str = "fp32") -> torch.Tensor:
    """States ``[n, L+1, d]`` (float32) of every unmasked token of a right-padded batch, row-major; the
    forward runs under autocast to ``dtype`` (``"fp32"``: as the model is, ``"bf16"``, ``"fp16"``)."""
    if dtype not in AUTOCAST:
        raise InputError(f"dtype {dtype!r} unknown; use one of {', '.join(AUTOCAST)}")
    cast = AUTOCAST[dtype]
    autocast = torch.autocast(adapter.device.type, dtype=cast, enabled=cast is not None)
    mask = mask.to(adapter.device).bool()
    # no_grad, not inference mode: lens training backpropagates through what it does with the states
    with capture(adapter, "resid_pre", [0]) as first, capture(adapter, "resid_post") as blocks, \
            torch.no_grad(), autocast:
        adapter.run(ids.to(adapter.device), mask)
    states = [first["resid_pre", 0]] + [blocks["resid_post", layer] for layer in range(adapter.n_layers)]
    return torch.stack([s[mask].float() for s in states], dim=1)
