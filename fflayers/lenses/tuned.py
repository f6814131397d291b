"""The tuned lens (Belrose et al. 2023): per layer an affine translator ``h + A h + b``, trained on
KL(final || lens); and the hybrid, whose translators start at the least-squares shortcut maps.

Saved in the ``tuned-lens`` package's own layout, so lenses move between the two: ``config.json``
(``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``, ``bias``, ``base_model_revision``,
``unembed_hash``, ``lens_type``) and ``params.pt`` (the state dict of the list of translators:
``"{l}.weight"`` ``[d, d]`` and ``"{l}.bias"`` ``[d]`` for layers 0..L-1). fflayers adds
``fflayers_lens.json`` (the model fingerprint and an unembedding digest, the lens kind, how it was trained),
which the ``tuned-lens`` package ignores; a lens without it (trained there) is checked by its sizes only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError, ModelError
from fflayers.lenses.lens import VectorLens, check_lens_layer

__all__ = ["LENS_CONFIG", "LENS_META", "LENS_PARAMS", "TunedLens", "load_lens", "unembedding_digest"]

LENS_CONFIG, LENS_PARAMS, LENS_META = "config.json", "params.pt", "fflayers_lens.json"
META_FORMAT = "fflayers-lens/1"


@torch.no_grad()
def unembedding_digest(adapter: LMAdapter) -> str:
    """SHA-256 of the output embedding matrix (float32): what a lens reads its translation through."""
    E = adapter.output_embeddings().detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(E.numpy().tobytes()).hexdigest()


class TunedLens(VectorLens):
    """Translators ``h -> h + A_l h + b_l`` for the states 0..L-1 (zero: the logit lens); state L is read as
    it is. ``translators`` is an ``nn.ModuleList`` of ``nn.Linear(d, d)`` (float32, trainable)."""

    def __init__(self, adapter: LMAdapter, bias: bool = True, kind: str = "tuned") -> None:
        super().__init__(adapter)
        d, L = adapter.d_model, adapter.n_layers
        self.kind = self.name = kind  # tables name a lens by its kind
        self.translators = nn.ModuleList(nn.Linear(d, d, bias=bias) for _ in range(L))
        with torch.no_grad():
            for t in self.translators:
                t.weight.zero_()
                if t.bias is not None:
                    t.bias.zero_()
        self.translators.to(adapter.device)
        self.meta: dict[str, Any] = {}

    @classmethod
    def from_shortcuts(cls, adapter: LMAdapter, maps: Mapping[tuple[int, int], torch.Tensor],
                       bias: bool = True) -> TunedLens:
        """The hybrid: translator l starts at the shortcut map ``A_{L,l}`` (weight ``A - I``, bias 0), so it
        starts as the ``mat`` lens; training then goes on from there."""
        lens = cls(adapter, bias=bias, kind="hybrid")
        L, d = adapter.n_layers, adapter.d_model
        eye = torch.eye(d)
        with torch.no_grad():
            for layer in range(L):
                A = maps.get((L, layer))
                if A is None:
                    raise InputError(f"the hybrid lens needs the shortcut map ({L}, {layer}); fit maps to "
                                     "the last layer from every layer first")
                if tuple(A.shape) != (d, d):
                    raise InputError(f"shortcut map ({L}, {layer}) is {tuple(A.shape)}, expected {(d, d)}")
                lens.translators[layer].weight.copy_(A.float().cpu() - eye)
        return lens

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        if check_lens_layer(self.adapter, layer) == self.adapter.n_layers:
            return h
        h = h.float()
        return h + self.translators[layer](h)

    def parameters(self):
        """The translators' parameters (what training updates)."""
        return self.translators.parameters()

    # ----- files -------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.json``, ``params.pt`` (the tuned-lens layout) and ``fflayers_lens.json``; each
        file is written to a temporary name and renamed, ``params.pt`` first."""
        from fflayers.io import atomic_write, write_json
        from fflayers.runs import model_fingerprint

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.translators.state_dict().items()}
        for key, value in state.items():
            if not torch.isfinite(value).all():
                raise ModelError(f"lens parameter {key} is not finite; nothing saved")
        with atomic_write(folder / LENS_PARAMS, "wb", encoding=None) as f:
            torch.save(state, f)
        cfg = self.adapter.model.config if hasattr(self.adapter.model, "config") else None
        config = {
            "base_model_name_or_path": str(getattr(cfg, "name_or_path", "") or self.adapter.family),
            "d_model": self.adapter.d_model,
            "num_hidden_layers": self.adapter.n_layers,
            "bias": self.translators[0].bias is not None,
            "base_model_revision": None,
            "unembed_hash": None,
            "lens_type": "linear_tuned_lens",
        }
        write_json(folder / LENS_CONFIG, config)
        meta = {"format": META_FORMAT, "kind": self.kind, "model": model_fingerprint(self.adapter),
                "unembedding": unembedding_digest(self.adapter), **dict(extra or {})}
        write_json(folder / LENS_META, meta)
        self.meta = meta
        return folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not a readable JSON file ({e})") from None


def load_lens(folder: str | os.PathLike, adapter: LMAdapter) -> TunedLens:
    """A tuned (or hybrid) lens from a folder in the tuned-lens layout, checked against ``adapter``: sizes
    always, and with ``fflayers_lens.json`` the model fingerprint and the unembedding digest."""
    from fflayers.runs import model_fingerprint

    folder = Path(folder)
    config_path, params_path = folder / LENS_CONFIG, folder / LENS_PARAMS
    for path in (config_path, params_path):
        if not path.is_file():
            raise InputError(f"{path} is missing: a lens folder holds {LENS_CONFIG} and {LENS_PARAMS} "
                             "(the tuned-lens layout)")
    config = _read_json(config_path)
    d, L = config.get("d_model"), config.get("num_hidden_layers")
    if d != adapter.d_model:
        raise InputError(f"{folder} is a lens for d_model {d}, but the model has d_model {adapter.d_model}")
    if L != adapter.n_layers:
        raise InputError(f"{folder} is a lens for {L} layers, but the model has {adapter.n_layers}")
    meta = _read_json(folder / LENS_META) if (folder / LENS_META).is_file() else {}
    if meta:
        here = model_fingerprint(adapter)
        if meta.get("model") != here:
            raise InputError(f"{folder} was trained for model {str(meta.get('model'))[:12]}, this model is "
                             f"{here[:12]}: train a lens for this model")
        if meta.get("unembedding") != unembedding_digest(adapter):
            raise InputError(f"{folder} was trained through another unembedding "
                             f"({str(meta.get('unembedding'))[:12]}); train a lens for this model")
    try:
        state = torch.load(params_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        reason = str(e).splitlines()[0][:120]
        raise InputError(f"{params_path} is not a lens parameter file ({reason})") from None
    if not isinstance(state, dict):
        raise InputError(f"{params_path} holds {type(state).__name__}, not a state dict of translators")
    lens = TunedLens(adapter, bias=bool(config.get("bias", True)), kind=str(meta.get("kind", "tuned")))
    try:
        lens.translators.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise InputError(f"{params_path} does not match {L} translators of size {d} "
                         f"({str(e).splitlines()[0][:150]})") from None
    lens.translators.to(adapter.device)
    lens.meta = meta
    return lens
