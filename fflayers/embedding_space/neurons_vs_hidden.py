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

from fflayers.backends.base import AdapterError, LMAdapter
from fflayers.embedding_space.vocabulary import Embedding
from fflayers.hooks import capture

__all__ = ["neurons_vs_hidden", "overlap_by_layer", "value_token_union"]


def value_token_union(values: torch.Tensor, coefs: torch.Tensor, neurons: torch.Tensor, E: torch.Tensor,
                      k: int) -> set[int]:
    """Union of the top-``k`` tokens of ``sign(m_i) v_i @ E^T`` over the given neurons."""
    vecs = values[neurons].float() * torch.sign(coefs[neurons].float())[:, None]
    return set((vecs @ E.T).topk(k, dim=1).indices.reshape(-1).tolist())


def neurons_vs_hidden(
    adapter: LMAdapter, E: Embedding, sentences: Sequence[Sequence[int]], layers: Sequence[int] | None = None,
    k: int = 10, n_neurons: int = 10, seed: int = 0, progress: bool = False,
) -> pd.DataFrame:
    """One row per sentence and layer: ``sentence, position, layer, overlap_active, overlap_random``."""
    from tqdm.auto import tqdm

    from fflayers.memories.value_projections import check_layers

    layers = check_layers(adapter, layers)
    if not sentences:
        raise AdapterError("no sentences; pass a non-empty corpus")
    if not 1 <= n_neurons <= adapter.d_ff:
        raise AdapterError(f"n_neurons = {n_neurons} must be between 1 and d_ff = {adapter.d_ff}")
    if not 1 <= k <= E.matrix.shape[0]:
        raise AdapterError(f"k = {k} must be between 1 and the vocabulary size {E.matrix.shape[0]}")
    rng = np.random.default_rng(seed)
    Em = E.matrix.detach().float().to(adapter.device)
    values = {layer: adapter.ffn_values(layer).detach().float() for layer in layers}
    norms = {layer: v.norm(dim=1) for layer, v in values.items()}
    rows = []
    for sid, seq in enumerate(tqdm(sentences, desc="neurons vs hidden", unit="sent", disable=not progress)):
        if not seq:
            continue
        adapter.check_length(len(seq))
        pos = int(rng.integers(len(seq)))
        ids = torch.as_tensor([list(seq)], dtype=torch.long, device=adapter.device)
        with torch.no_grad(), capture(adapter, ["mlp_coef", "resid_post"], layers=layers) as cache:
            adapter.run(ids)
        for layer in layers:
            h = cache["resid_post", layer][0, pos]
            m = cache["mlp_coef", layer][0, pos]
            with torch.no_grad():
                hidden = set(adapter.project(h[None]).topk(k, dim=1).indices.reshape(-1).tolist())
                active = (m.abs().float() * norms[layer]).topk(n_neurons).indices
                random = torch.as_tensor(rng.choice(adapter.d_ff, n_neurons, replace=False), device=m.device)
                act_tokens = value_token_union(values[layer], m, active, Em, k)
                rand_tokens = value_token_union(values[layer], m, random, Em, k)
            rows.append({"sentence": sid, "position": pos, "layer": layer,
                         "overlap_active": len(hidden & act_tokens) / k,
                         "overlap_random": len(hidden & rand_tokens) / k})
    return pd.DataFrame(rows)


def overlap_by_layer(table: pd.DataFrame) -> pd.DataFrame:
    """Mean overlaps per layer: ``layer, positions, overlap_active, overlap_random``."""
    g = table.groupby("layer", sort=True)
    return pd.DataFrame({"layer": list(g.groups), "positions": g.size().to_numpy(),
                         "overlap_active": g["overlap_active"].mean().to_numpy(),
                         "overlap_random": g["overlap_random"].mean().to_numpy()})
