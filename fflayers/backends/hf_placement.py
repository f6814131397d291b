"""Models larger than one device: transformers' and accelerate's own device maps, read back by the adapter.

``load_hf_lm(device_map=..., max_memory=..., offload_folder=...)`` hands the placement to
``from_pretrained`` (accelerate dispatches the blocks over GPUs, CPU memory and disk); nothing here moves a
block. The adapter then feeds inputs to the device of the token embedding, and reads the weights of a block
whose parameters are offloaded (on the ``meta`` device in the module tree) through accelerate's public
``align_module_device``: a copy, never a meta tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fflayers.core import InputError, ModelError

__all__ = ["DEVICE_MAP_STRATEGIES", "dispatched", "input_device", "is_offloaded", "parse_device_map",
           "parse_max_memory", "read_tensor"]

#: the device-map strategies of transformers' ``from_pretrained``
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str | dict | None) -> str | dict | None:
    """A strategy name, a JSON object (module name -> device: ``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``) or
    the path of a JSON file holding one; :class:`~fflayers.core.InputError` otherwise."""
    if text is None or isinstance(text, dict):
        return text
    if text in DEVICE_MAP_STRATEGIES:
        return text
    source = Path(text).read_text(encoding="utf-8") if Path(text).is_file() else text
    try:
        mapping = json.loads(source)
    except json.JSONDecodeError:
        raise InputError(f"--device_map {text!r} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) "
                         "nor a JSON object / file of module name -> device") from None
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(f"--device_map {text!r}: the JSON must be a non-empty object of module -> device")
    return mapping


def parse_max_memory(text: str | dict | None) -> dict | None:
    """``"0=20GiB,1=20GiB,cpu=60GiB"`` or a JSON object -> ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}``."""
    if text is None or isinstance(text, dict):
        return text
    try:
        pairs = json.loads(text) if text.lstrip().startswith("{") else dict(
            part.split("=", 1) for part in text.split(",") if part.strip())
    except (json.JSONDecodeError, ValueError):
        raise InputError(f"--max_memory {text!r}: write DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB") from None
    if not pairs:
        raise InputError(f"--max_memory {text!r} names no device; write pairs such as 0=20GiB,cpu=60GiB")
    return {int(k) if str(k).strip().isdigit() else str(k).strip(): str(v).strip() for k, v in pairs.items()}


def dispatched(model: nn.Module) -> bool:
    """Whether transformers placed the model with a device map (its blocks may sit on several devices)."""
    return bool(getattr(model, "hf_device_map", None))


def input_device(model: nn.Module, embed_path: str) -> torch.device:
    """The device a dispatched model reads its input ids on: that of its token embedding's entry in
    ``hf_device_map`` (the longest module name that is a prefix of ``embed_path``); CPU for disk."""
    device_map: dict = model.hf_device_map
    names = [n for n in device_map if n == "" or embed_path == n or embed_path.startswith(n + ".")]
    where = device_map[max(names, key=len)] if names else next(iter(device_map.values()))
    if isinstance(where, int):
        return torch.device("cuda", where)
    return torch.device("cpu" if where in ("cpu", "disk") else where)


def is_offloaded(tensor: torch.Tensor | None) -> bool:
    """A parameter whose data accelerate keeps elsewhere (CPU or disk) until its module runs."""
    return tensor is not None and tensor.device.type == "meta"


def read_tensor(owner: nn.Module, module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """``module.<name>`` itself; where it is offloaded, a detached copy loaded through accelerate's
    ``align_module_device`` on ``module`` where accelerate hooked it, else on ``owner`` (the dispatched module
    holding it: a block, the embedding, the head)."""
    tensor = getattr(module, name, None)
    if not is_offloaded(tensor):
        return tensor
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # pragma: no cover - transformers needs accelerate for device maps
        raise ModelError("reading offloaded weights needs accelerate; pip install accelerate") from None
    # accelerate hooks the leaf modules of an offloaded block, or the block itself
    holder = module if has_offloaded_params(module) else owner
    with align_module_device(holder, torch.device("cpu")):
        loaded = getattr(module, name)
        if is_offloaded(loaded):
            raise ModelError(f"accelerate did not load the offloaded {name} of {type(module).__name__}; "
                             "load the model without offloading to disk")
        return loaded.detach().clone()
