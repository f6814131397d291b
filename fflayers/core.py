"""The shared vocabulary of the code: errors, hook points, block layouts, hook sites and :class:`StopForward`.

This module imports nothing from fflayers, so backends, hooks and analyses all import it and never each other
in a circle.

Errors form one small hierarchy under :class:`FflayersError` (a ``ValueError``); the command-line tools catch
the base and print its message as one line with exit code 2:

* :class:`ModelError`: a model, checkpoint or adapter the code cannot use (``AdapterError`` is its old name);
* :class:`InputError`: bad user input: files, flags, values out of range, empty or undecodable data;
* :class:`RunStateError`: a run folder that conflicts with the request (resume with another config, another
  analysis's folder, an older format).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

__all__ = ["BLOCK_LAYOUTS", "FAIRSEQ_EXTRA", "HOOK_POINTS", "AdapterError", "FflayersError", "HookSite",
           "InputError", "ModelError", "RunStateError", "StopForward", "fairseq_installed", "require_fairseq"]


class FflayersError(ValueError):
    """Base of every error fflayers raises on purpose; the message says what is wrong and how to fix it."""


class ModelError(FflayersError):
    """A model, checkpoint or adapter the code cannot use."""


#: The former name of :class:`ModelError`, kept for code written against earlier releases.
AdapterError = ModelError


class InputError(FflayersError):
    """Bad user input: a missing or malformed file, a flag out of range, an empty corpus."""


class RunStateError(FflayersError):
    """A run folder that conflicts with the request (another config, another analysis, an older format)."""


#: How to add fairseq to an install without it (an optional extra: HuggingFace users skip its build).
FAIRSEQ_EXTRA = 'install the fairseq extra: pip install "fflayers[fairseq]"'


def fairseq_installed() -> bool:
    """Whether the fairseq package can be imported (checked without importing it)."""
    return importlib.util.find_spec("fairseq") is not None


def require_fairseq(what: str = "this is a fairseq model directory") -> None:
    """Raise a one-line :class:`ModelError` (``what``; how to install the extra) when fairseq is missing."""
    if not fairseq_installed():
        raise ModelError(f"{what}; {FAIRSEQ_EXTRA}")


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once everything needed was captured."""


#: Named places in a block where activations can be read or edited.
#: ``resid_pre``: stream entering the block; ``attn_in``: the attention sublayer's input (after its norm in
#: pre-norm blocks); ``attn_out``: attention sublayer output (before the residual add); ``mlp_in``: the FFN's
#: input (after its norm: what the keys read); ``mlp_key``: FFN pre-activations (fc1 / gate output);
#: ``mlp_coef``: FFN coefficients m (input of fc2 / down); ``mlp_out``: FFN output (before the residual add);
#: ``resid_post``: stream leaving the block.
HOOK_POINTS: tuple[str, ...] = ("resid_pre", "attn_in", "attn_out", "mlp_in", "mlp_key", "mlp_coef",
                                "mlp_out", "resid_post")

#: How a block wires its sublayers (``LMAdapter.block_layout``):
#: ``"pre_norm"``: x + attn(ln1(x)) = m, then m + mlp(ln2(m)) (GPT-2, GPT-Neo, Llama, fairseq
#: normalize_before);
#: ``"post_norm"``: m = ln1(x + attn(x)), then ln2(m + mlp(m)) (BERT, fairseq's default transformer_lm);
#: ``"parallel"``: x + attn(ln1(x)) + mlp(ln2(x)) (GPT-J with one shared norm, GPT-NeoX/Pythia);
#: ``"sandwich"``: x + post1(attn(ln1(x))) = m, then m + post2(mlp(ln2(m))) (Gemma 2; OLMo 2 without ln1
#: and ln2): a norm after each sublayer. The stream adds up as in pre_norm (attn_out and mlp_out are what is
#: added, after post1 and post2); the FFN values are the rows of the down projection, before post2:
#: mlp_out = post2(sum m_i v_i).
BLOCK_LAYOUTS: tuple[str, ...] = ("pre_norm", "post_norm", "parallel", "sandwich")


@dataclass(frozen=True)
class HookSite:
    """Where a hook point lives in the module tree.

    ``module`` is hooked on its ``"input"`` (first positional argument, or keyword ``arg_name``) or its
    ``"output"`` (the tensor, or element 0 of a tuple). ``time_first`` marks modules whose tensors are
    ``[positions, batch, features]`` (fairseq); the hook machinery transposes them to batch-first.
    ``features`` ``(start, stop)``: the point is that slice of the last axis (a fused projection's part, such
    as the gate half of Phi-3's ``gate_up_proj``); edits write that slice only.
    """

    module: Any  # a torch.nn.Module (not imported here to keep this module a leaf)
    side: str  # "input" or "output"
    time_first: bool = False
    arg_name: str = "hidden_states"
    features: tuple[int, int] | None = None
