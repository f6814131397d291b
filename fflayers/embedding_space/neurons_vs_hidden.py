"""Do a layer's most active values say, in embedding space, what the hidden state says?

For one random position per sentence (seeded) and every layer: the top-``k`` tokens of the hidden state after
the layer (``resid_post``, through the model's own head: :meth:`LMAdapter.project`), and the top-``k`` tokens
(``E`` projection) of the layer's ``n_neurons`` most active values, ranked by ``|m_i| * ||v_i||``, each taken
in the direction it is written (``sign(m_i) v_i``). ``overlap_active`` is the share of the hidden state's
top-``k`` tokens found among the values' tokens; ``overlap_random`` the same for ``n_neurons`` neurons drawn
at random (seeded), the chance level.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.embedding_space.vocabulary import Embedding
from fflayers.hooks import capture

__all__ = ["neurons_vs_hidden", "overlap_by_layer"]


def neurons_vs_hidden(
    adapter: LMAdapter, E: Embedding, sentences: Sequence[Sequence[int]], layers: Sequence[int] | None = None,
    k: int = 10, n_neurons: int = 10, seed: int = 0, progress: bool = False,
) -> pd.DataFrame:
    """One row per sentence and layer: ``sentence, position, layer, overlap_active, overlap_random``."""
    from tqdm.auto import tqdm

    layers = adapter.check_layers(layers)
    if not sentences:
        raise InputError("no sentences; pass a non-empty corpus")
    if not 1 <= n_neurons <= adapter.d_ff:
        raise InputError(f"n_neurons = {n_neurons} must be between 1 and d_ff = {adapter.d_ff}")
    if not 1 <= k <= E.matrix.shape[0]:
        raise InputError(f"k = {k} must be between 1 and the vocabulary size {E.matrix.shape[0]}")
    rng = np.random.default_rng(seed)
    Em = E.matrix.detach().float().to(adapter.device)
    values = torch.stack([adapter.ffn_values(layer).detach().float() for layer in layers])  # [L, d_ff, d]
    norms = values.norm(dim=2)  # [L, d_ff]
    L = len(layers)
    rows = []
    for sid, seq in enumerate(tqdm(sentences, desc="neurons vs hidden", unit="sent", disable=not progress)):
        if not seq:
            continue
        adapter.check_length(len(seq))
        pos = int(rng.integers(len(seq)))
        ids = torch.as_tensor([list(seq)], dtype=torch.long, device=adapter.device)
        with torch.no_grad(), capture(adapter, ["mlp_coef", "resid_post"], layers=layers) as cache:
            adapter.run(ids)
        with torch.no_grad():
            hidden = adapter.project(torch.stack([cache["resid_post", layer][0, pos] for layer in layers]))
            hidden = hidden.topk(k, dim=1).indices.cpu()  # [L, k]
            m = torch.stack([cache["mlp_coef", layer][0, pos] for layer in layers]).float()  # [L, d_ff]
            active = (m.abs() * norms).topk(n_neurons, dim=1).indices  # [L, n]
            random = torch.as_tensor(np.stack([rng.choice(adapter.d_ff, n_neurons, replace=False)
                                               for _ in layers]),
                                     device=m.device)
            chosen = torch.cat([active, random])  # [2L, n]
            li = torch.arange(L, device=m.device).repeat(2)[:, None]
            vecs = values[li, chosen] * torch.sign(m[li, chosen])[..., None]  # [2L, n, d]
            tokens = (vecs.reshape(-1, vecs.shape[-1]) @ Em.T).topk(k, dim=1).indices.reshape(2 * L, -1).cpu()
        for j, layer in enumerate(layers):
            hid = set(hidden[j].tolist())
            rows.append({"sentence": sid, "position": pos, "layer": layer,
                         "overlap_active": len(hid & set(tokens[j].tolist())) / k,
                         "overlap_random": len(hid & set(tokens[L + j].tolist())) / k})
    return pd.DataFrame(rows)


def overlap_by_layer(table: pd.DataFrame) -> pd.DataFrame:
    """Mean overlaps per layer: ``layer, positions, overlap_active, overlap_random``."""
    g = table.groupby("layer", sort=True)
    return pd.DataFrame({"layer": list(g.groups), "positions": g.size().to_numpy(),
                         "overlap_active": g["overlap_active"].mean().to_numpy(),
                         "overlap_random": g["overlap_random"].mean().to_numpy()})
