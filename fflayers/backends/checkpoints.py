"""Read fairseq checkpoints safely, and bring old ones up to date.

:func:`load_checkpoint` uses ``torch.load(..., weights_only=True)`` with an explicit allow-list
(:func:`safe_globals`) of the Python objects fairseq checkpoints legitimately carry besides tensors:

* new checkpoints (fairseq >= 0.10, as written by ``fairseq-train`` here): ``cfg`` is a plain dict, so only
  ``collections.OrderedDict`` and tensors occur; some carry numpy scalars (losses) and, from a few versions,
  ``cfg`` as an omegaconf ``DictConfig``;
* old checkpoints (the published WikiText-103 adaptive LM): ``args`` is an ``argparse.Namespace`` and there is
  no ``cfg``; the self-attention projections may be fused into ``in_proj_weight`` / ``in_proj_bias``.

fairseq's dataclass choice enums (``ChoiceEnum``) are not listed: they cannot be pickled (every one is a class
named ``Choices``), so no checkpoint holds them; fairseq stores ``cfg`` with ``enum_to_str=True``.

Anything else is refused with an :class:`~fflayers.backends.base.ModelError` naming the offending global;
full unpickling (which can run arbitrary code) happens only with ``trust_checkpoint=True``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import pickle
import re
import typing
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from fflayers.core import ModelError

__all__ = [
    "safe_globals",
    "load_checkpoint",
    "checkpoint_config",
    "upgrade_checkpoint",
    "split_fused_attention",
    "namespace_to_config",
]


def safe_globals() -> list[Any]:
    """The allow-list of non-tensor globals accepted in weights-only loading (see the module docstring)."""
    import numpy as np
    import omegaconf
    from omegaconf import base as oc_base
    from omegaconf import nodes as oc_nodes

    allowed: list[Any] = [
        argparse.Namespace,
        collections.OrderedDict,
        collections.defaultdict,  # appears (empty) inside pickled omegaconf configs
        typing.Any,
        # plain types (DictConfig key / element types)
        int, float, str, bool, list, dict, tuple, frozenset, bytes, type(None), slice,
        omegaconf.DictConfig,
        omegaconf.ListConfig,
        oc_base.ContainerMetadata,
        oc_base.Metadata,
        oc_nodes.AnyNode,
        oc_nodes.StringNode,
        oc_nodes.IntegerNode,
        oc_nodes.FloatNode,
        oc_nodes.BooleanNode,
        oc_nodes.BytesNode,
        oc_nodes.PathNode,
        oc_nodes.EnumNode,
        # numpy scalars / arrays (e.g. best validation loss); numpy-2 pickles name them numpy._core.*
        np.ndarray,
        np.dtype,
    ]
    from numpy.core import multiarray

    for fn in (multiarray.scalar, multiarray._reconstruct):
        allowed.append((fn, f"numpy.core.multiarray.{fn.__name__}"))
        allowed.append((fn, f"numpy._core.multiarray.{fn.__name__}"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return allowed


_GLOBAL_RE = re.compile(r"GLOBAL (\S+)")
_UNKNOWN_FN_RE = re.compile(r"(?:unrecognized function|got) <?(?:class |built-in function )?'?([\w.]+)")


def _offending_global(message: str) -> str | None:
    """The global a weights-only load refused (``posix.system``, ``mymodule.MyClass``), from torch's
    message."""
    m = _GLOBAL_RE.search(message) or _UNKNOWN_FN_RE.search(message)
    if m:
        return m.group(1).rstrip(".,;:'")
    if "Unsupported global" in message or "allowlisted" in message:
        return "an object that is not a tensor"
    return None


def _looks_like_checkpoint(path: Path) -> bool:
    """Cheap format check: a torch zip archive, or a legacy pickle stream (starts with the PROTO opcode)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80


#: how torch's legacy (pre-zip) format starts: the pickled magic number 0x1950a86a20f9469cfc6c
_LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _is_plain_pickle(path: Path) -> bool:
    """A pickle stream that is not torch's legacy checkpoint format (no magic number first)."""
    if zipfile.is_zipfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(2 + len(_LEGACY_MAGIC))
    return head[2:] != _LEGACY_MAGIC


def load_checkpoint(path: str | Path, trust_checkpoint: bool = False) -> dict:
    """Load a checkpoint to CPU; weights-only with :func:`safe_globals` unless ``trust_checkpoint``.

    Raises :class:`ModelError` (one line) for a missing, corrupt or truncated file, and for a file that
    carries an object outside the allow-list (naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist; pass the path of a fairseq .pt file")
    if path.stat().st_size == 0 or not _looks_like_checkpoint(path):
        raise ModelError(f"checkpoint {path} is not a torch checkpoint (corrupt or truncated); "
                         "re-download or re-save it")
    if _is_plain_pickle(path):
        raise ModelError(f"checkpoint {path} is a plain pickle, not a torch checkpoint; nothing in it was "
                         "run (unpickling runs code); if you trust it, re-save it where you do: "
                         "torch.save(pickle.load(open(PATH, 'rb')), 'model.pt')")
    try:
        if trust_checkpoint:
            state = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(safe_globals()):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = " ".join(str(e).split())
        refused = "Weights only load failed" in msg
        if "WeightsUnpickler error:" in msg:
            msg = msg.split("WeightsUnpickler error:", 1)[1].strip()
        offending = _offending_global(msg)
        if not trust_checkpoint and refused and offending is not None:
            raise ModelError(
                f"checkpoint {path} was refused: it needs {offending}, which is not on fflayers' allow-list "
                "for safe loading, and nothing in it was executed; if you trust the file, pass "
                "--trust-checkpoint (trust_checkpoint=True), which unpickles it in full and runs its code"
            ) from None
        raise ModelError(f"checkpoint {path} could not be read (corrupt or truncated?): "
                         f"{msg[:160]}") from None
    except (ImportError, AttributeError) as e:  # full unpickling met a class this environment does not have
        raise ModelError(
            f"checkpoint {path} refers to Python objects missing here ({str(e)[:120]}); "
            "it was saved by another fairseq version: load it there and re-save the 'args'/'cfg' "
            "and 'model' entries"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, IndexError, KeyError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ModelError(f"checkpoint {path} could not be read (corrupt or truncated?): "
                         f"{msg[:200]}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ModelError(f"checkpoint {path} holds no fairseq model state ('model' key missing); "
                         "pass a fairseq checkpoint")
    return state


def namespace_to_config(args: argparse.Namespace):
    """fairseq config (omegaconf ``DictConfig``) from an old-style ``args`` Namespace, via fairseq's
    converter."""
    args = copy.deepcopy(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fairseq / hydra deprecation chatter
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf

        return convert_namespace_to_omegaconf(args)


def split_fused_attention(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace fused ``*.in_proj_weight`` / ``*.in_proj_bias`` (rows q, k, v stacked) by
    ``q_proj`` / ``k_proj`` / ``v_proj`` weights and biases; returns a new dict (tensors shared)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        for kind in ("weight", "bias"):
            suffix = f"in_proj_{kind}"
            if key == suffix or key.endswith("." + suffix):
                prefix = key[: -len(suffix)]
                if value.shape[0] % 3:
                    raise ModelError(f"fused attention tensor {key} has {value.shape[0]} rows, "
                                     "not a multiple of 3")
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}{name}.{kind}"] = part
                break
        else:
            out[key] = value
    return out


def upgrade_checkpoint(state: dict) -> dict:
    """Bring a loaded checkpoint to the current fairseq layout (in place, also returned).

    ``cfg`` becomes an omegaconf ``DictConfig`` (from ``args`` through fairseq's own upgrade and
    ``convert_namespace_to_omegaconf`` for old checkpoints), and fused attention weights are split.
    """
    from omegaconf import OmegaConf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # fairseq has no public function that upgrades an in-memory checkpoint; its private one is guarded
        try:
            from fairseq.checkpoint_utils import _upgrade_state_dict
        except ImportError:
            import fairseq

            raise ModelError(
                f"fairseq {getattr(fairseq, '__version__', '?')} has no "
                "checkpoint_utils._upgrade_state_dict, which fflayers uses to convert checkpoints; "
                "install the tested fairseq-fixed==0.12.3.1 (make install)"
            ) from None

    if state.get("args") is None and state.get("cfg") is None:
        raise ModelError("checkpoint has neither 'args' nor 'cfg'; it is not a fairseq training checkpoint")
    if state.get("cfg") is not None and not OmegaConf.is_config(state["cfg"]):
        state["cfg"] = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    state.setdefault("extra_state", {})
    state.setdefault("optimizer_history", [{"criterion_name": "CrossEntropyCriterion", "best_loss": None}])
    if state.get("args") is not None:
        state["args"] = copy.deepcopy(state["args"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = _upgrade_state_dict(state)
    except Exception as e:  # fairseq raises many kinds of errors for configs it cannot convert
        raise ModelError(f"cannot convert the checkpoint's configuration: {type(e).__name__}: "
                         f"{str(e)[:150]}") from None
    state["model"] = split_fused_attention(state["model"])
    return state


def checkpoint_config(state: dict):
    """The fairseq ``DictConfig`` of an (upgraded) checkpoint."""
    cfg = state.get("cfg")
    if cfg is None:
        raise ModelError("checkpoint has no configuration; call upgrade_checkpoint() first")
    return cfg
