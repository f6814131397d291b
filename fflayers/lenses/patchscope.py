"""The token-identity Patchscope (Ghandeharioun et al. 2024): the state of layer ``l`` is patched into a
prompt that asks the model to repeat a token, at the prompt's last position and the same layer, and the
model's next-token distribution there is the reading.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.hooks import intervene, replace
from fflayers.lenses.lens import Lens, check_lens_layer

__all__ = ["IDENTITY_PROMPT", "TokenIdentityPatchscope"]

#: the target prompt: a few "x -> x" pairs, then the slot the patched state fills
IDENTITY_PROMPT = "cat -> cat; 1135 -> 1135; hello -> hello; ?"


class TokenIdentityPatchscope(Lens):
    """State ``l`` replaces the stream entering block ``l`` (state L: the final stream) at the last position
    of the target prompt; one patched forward per state, ``batch_size`` at a time."""

    name = "patchscope"

    def __init__(self, adapter: LMAdapter, prompt: str | Sequence[int] = IDENTITY_PROMPT,
                 batch_size: int = 32) -> None:
        """``prompt``: the target prompt as text, or as token ids."""
        super().__init__(adapter)
        ids = adapter.vocab.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if len(ids) < 2:
            raise InputError(f"the Patchscope prompt {prompt!r} gives {len(ids)} token(s); it needs a few "
                             "'x -> x' pairs before the last position")
        adapter.check_length(len(ids))
        self.prompt = prompt
        self.ids = torch.tensor([ids])
        self.batch_size = batch_size

    def log_probs(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        L = self.adapter.n_layers
        check_lens_layer(self.adapter, layer)
        shape = h.shape[:-1]
        rows = h.reshape(-1, h.shape[-1])
        outs = []
        for start in range(0, rows.shape[0], self.batch_size):
            chunk = rows[start : start + self.batch_size]
            if layer == L:  # patching the final stream: the model reads it with its own head
                outs.append(self.adapter.project(chunk).float())
                continue
            ids = self.ids.expand(chunk.shape[0], -1)
            last = ids.shape[1] - 1
            edit = replace("resid_pre", layer, chunk[:, None, :], positions=[last])
            with intervene(self.adapter, [edit]), torch.no_grad():
                stream = self.adapter.run(ids)
            outs.append(self.adapter.project(stream[:, last]).float())
        return torch.cat(outs).reshape(*shape, -1)
