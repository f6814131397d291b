"""Reference implementation of the original ``--extract_mode dim`` algorithm, kept only for benchmarking.

Per sentence: one forward pass of the model on the whole sentence with hooks; then, at the sentence's chosen
position, for every layer a Python loop over the dims that projects each sub-update ``m_i v_i`` through the
output head on its own (one head call per dim) and reads its top-1 and the rank of the model's final top-1.
This is how the original spent 4.2 hours on 1000 sentences;
:func:`fflayers.memories.ffn_info.extract_ffn_info` computes the same table (same positions, same columns) in
batched form.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from fflayers.backends.base import LMAdapter
from fflayers.hooks import capture
from fflayers.memories.ffn_info import DIM_COLUMNS, _is_post_ln, choose_positions


@torch.no_grad()
def reference_dim_mode(
    adapter: LMAdapter,
    sentences: Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    seed: int = 0,
    timings: dict | None = None,
) -> pd.DataFrame:
    """Dim-mode table computed one sentence and one dim at a time (see the module docstring).

    ``timings`` (if given) receives ``forward_s`` (model runs), ``project_s`` (per-dim head calls) and
    ``n_project``.
    """
    layers = list(range(adapter.n_layers)) if layers is None else list(layers)
    dims = list(range(adapter.d_ff)) if dims is None else list(dims)
    positions = choose_positions([len(s) for s in sentences], seed, adapter.max_positions)
    post_ln = _is_post_ln(adapter)
    values = {layer: adapter.ffn_values(layer).detach() for layer in layers}
    norms = {layer: values[layer].float().norm(dim=1) for layer in layers}
    t_fwd = t_proj = 0.0
    n_proj = 0
    rows = []
    for k, seq in enumerate(sentences):
        t = int(positions[k])
        if t < 0:
            continue
        limit = adapter.max_positions or len(seq)
        ids = torch.tensor([list(seq)[:limit]])
        t0 = time.perf_counter()
        points = ["mlp_in", "mlp_coef"] if post_ln else ["resid_pre", "attn_out", "mlp_coef"]
        with capture(adapter, points, layers=layers) as cache:
            final = adapter.run(ids)
        final_top1 = int(adapter.project(final[0, t][None])[0].argmax())
        t_fwd += time.perf_counter() - t0
        t0 = time.perf_counter()
        for layer in layers:
            r = (cache["mlp_in", layer][0, t] if post_ln
                 else cache["resid_pre", layer][0, t] + cache["attn_out", layer][0, t])
            m = cache["mlp_coef", layer][0, t]
            lp_r = adapter.project(r[None])[0]
            coef, top, rank = [], [], []
            for i in dims:
                coef.append(float(m[i]) * float(norms[layer][i]))
                if m[i] == 0:
                    top.append(-1)
                    rank.append(-1)
                    continue
                lp = adapter.project((m[i] * values[layer][i])[None])[0]
                top.append(int(lp.argmax()))
                rank.append(int((lp > lp[final_top1]).sum()))
                n_proj += 1
            rows.append({
                "sentence": k, "position": t, "next_token": int(seq[t + 1]), "layer": layer,
                "final_top1": final_top1, "residual_top1": int(lp_r.argmax()),
                "residual_final_rank": int((lp_r > lp_r[final_top1]).sum()),
                "coefficients": np.asarray(coef, dtype=np.float32), "value_top1": np.asarray(top),
                "value_final_rank": np.asarray(rank),
            })
        t_proj += time.perf_counter() - t0
    if timings is not None:
        timings.update(forward_s=t_fwd, project_s=t_proj, n_project=n_proj)
    return pd.DataFrame(rows, columns=DIM_COLUMNS)
