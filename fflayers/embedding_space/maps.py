"""2-D maps of a vector's top tokens: t-SNE (scikit-learn) of their embedding vectors, as a matplotlib figure
and an interactive, self-contained HTML page (plotly, the library embedded: opens offline)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch

from fflayers.core import InputError
from fflayers.embedding_space.vocabulary import Embedding

__all__ = ["token_map", "write_token_map_html"]


def token_map(E: Embedding, tokens: list[str], vector: torch.Tensor, k: int = 100, seed: int = 0,
              perplexity: float | None = None) -> pd.DataFrame:
    """Top-``k`` tokens of ``vector @ E^T`` placed in 2-D by t-SNE of their (unit-normalised) embedding
    vectors: columns ``rank, token_id, token, score, x, y``. Deterministic for a given ``seed``."""
    from sklearn.manifold import TSNE

    V = E.matrix.shape[0]
    if not 5 <= k <= V:
        raise InputError(f"k = {k} must be between 5 and the vocabulary size {V} for a map")
    with torch.no_grad():
        scores = vector.float().reshape(-1) @ E.matrix.float().T
        top = scores.topk(k)
        vecs = E.matrix[top.indices].double()
        vecs = vecs / vecs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    perplexity = perplexity or float(min(30.0, (k - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        vecs.numpy())
    ids = top.indices.tolist()
    return pd.DataFrame({"rank": np.arange(k), "token_id": ids, "token": [tokens[i] for i in ids],
                         "score": top.values.double().numpy(), "x": xy[:, 0], "y": xy[:, 1]})


def write_token_map_html(table: pd.DataFrame, path: str | os.PathLike, title: str) -> None:
    """An interactive scatter of :func:`token_map` (hover: token, rank, score), with plotly.js embedded in the
    file (no network needed to open it). Written atomically."""
    import plotly.graph_objects as go

    from fflayers.io import atomic_write

    fig = go.Figure(go.Scatter(
        x=table["x"], y=table["y"], mode="markers+text", text=[repr(t)[1:-1] for t in table["token"]],
        textposition="top center",
        marker={"color": table["score"], "colorscale": "Viridis", "showscale": True,
                "colorbar": {"title": "score"}},
        customdata=np.stack([table["rank"], table["score"]], axis=1),
        hovertemplate="%{text}<br>rank %{customdata[0]}<br>score %{customdata[1]:.3f}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="t-SNE 1", yaxis_title="t-SNE 2", template="simple_white")
    with atomic_write(path) as f:
        f.write(fig.to_html(include_plotlyjs=True, full_html=True))
