"""Integrated gradients of a target token's probability with respect to FFN activations (Dai et al. 2021).

For target token ``t`` predicted at position ``pos``, layer ``l`` with activation ``a`` (``[d_ff]``, read at
``pos``) and baseline ``b``::

    Attr_l = (a - b) * mean_k  dP(t) / dx  at  x = b + alpha_k (a - b)

where only layer ``l``'s activation at ``pos`` is set to ``x``; every other position and layer is computed
normally. A multi-token target averages the attributions of its tokens.

All (token, layer, alpha) combinations are rows of one batch: row ``r`` scales only its own layer at its own
position, through a leaf tensor per layer that autograd differentiates; rows are processed ``batch_size`` at a
time, each chunk with one forward and one backward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.hooks import capture, hooked
from fflayers.neurons.targets import TargetInput

#: attribution conventions: the activation attributed (and switched by suppress / enhance) and the alpha grid
CONVENTIONS = ("paper", "kn-package")
#: what ``KnowledgeNeurons.get_scores`` computes (the knowledge-neurons package's names): integrated
#: gradients, or the plain activations at the target positions
ATTRIBUTION_METHODS = ("integrated_grads", "max_activations")


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise InputError(f"unknown convention {convention!r}; choose from {', '.join(CONVENTIONS)}")
    return convention


def check_attribution_method(method: str) -> str:
    if method not in ATTRIBUTION_METHODS:
        raise InputError(f"unknown attribution_method {method!r}; "
                         f"choose from {', '.join(ATTRIBUTION_METHODS)}")
    return method


def attributed_point(adapter: LMAdapter, convention: str) -> str:
    """Hook point attributed: ``mlp_coef`` (post-activation) for ``"paper"``; for ``"kn-package"`` the
    knowledge-neurons package's choice: pre-activation ``mlp_key`` for causal LMs (GPT-2's ``mlp.c_fc``
    output), ``mlp_coef`` for BERT (its ``intermediate`` output, after the activation). Suppress and enhance
    (:mod:`fflayers.neurons.modify`) act on the same point."""
    if check_convention(convention) == "paper" or adapter.is_masked_lm:
        return "mlp_coef"
    return "mlp_key"


def alpha_grid(steps: int, convention: str) -> torch.Tensor:
    """Scaling factors: ``k / m`` for ``k = 1..m`` (``"paper"``) or ``linspace(0, 1, m)``
    (``"kn-package"``)."""
    steps = check_steps(steps)
    if check_convention(convention) == "paper":
        return torch.arange(1, steps + 1, dtype=torch.float64) / steps
    return torch.linspace(0.0, 1.0, steps, dtype=torch.float64)


def check_steps(steps: int) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    return steps


def check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer (rows per forward pass), got {batch_size!r}")
    return batch_size


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Parameters do not require gradients in the body (no graph below the first scaled layer); restored
    after."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _baseline(baseline: float | torch.Tensor, n_layers: int, d_ff: int, device) -> torch.Tensor:
    b = torch.as_tensor(baseline, dtype=torch.float32, device=device)
    try:
        return b.expand(n_layers, d_ff)
    except RuntimeError:
        raise InputError(f"baseline of shape {tuple(b.shape)} does not broadcast to [layers, d_ff] = "
                         f"[{n_layers}, {d_ff}]; "
                         "give a number, a [d_ff] or a [layers, d_ff] tensor") from None


def target_activations(adapter: LMAdapter, target: TargetInput, point: str,
                       layers: Sequence[int]) -> torch.Tensor:
    """``[len(layers), n_targets, d_ff]`` activations at the target positions in an ordinary forward pass."""
    with torch.no_grad(), capture(adapter, point, layers, stop_early=True) as cache:
        adapter.run(target.ids)
    pos = torch.as_tensor(target.positions, device=adapter.device)
    return torch.stack([cache[point, layer][0, pos].float() for layer in layers])


def integrated_gradients(
    adapter: LMAdapter,
    target: TargetInput,
    point: str,
    alphas: torch.Tensor,
    batch_size: int = 10,
    layers: Sequence[int] | None = None,
    baseline: float | torch.Tensor = 0.0,
    progress: bool = False,
) -> torch.Tensor:
    """Attributions ``[len(layers), d_ff]`` (detached, float32, on the adapter's device) of hook point
    ``point`` at the target positions, averaged over the target tokens:
    ``(a - b) * sum_k grad(b + alpha_k (a - b)) / m`` with ``m = len(alphas)``. ``baseline``: a number,
    ``[d_ff]`` or ``[layers, d_ff]`` (all model layers)."""
    batch_size = check_batch_size(batch_size)
    adapter.model.eval()
    layers = list(range(adapter.n_layers)) if layers is None else [adapter.check_layer(x) for x in layers]
    dev = adapter.device
    acts = target_activations(adapter, target, point, layers)  # [Ls, n, d_ff]
    d_ff = acts.shape[-1]
    base = _baseline(baseline, adapter.n_layers, d_ff, dev)[layers][:, None]  # [Ls, 1, d_ff]
    delta = acts - base
    alphas = alphas.to(dev, torch.float32)
    n_tok, m = target.n_targets, alphas.numel()
    # rows in (layer, token, alpha) order: a chunk holds few layers, so its backward pass stops early
    li, ti, ki = torch.meshgrid(torch.arange(len(layers)), torch.arange(n_tok), torch.arange(m),
                                indexing="ij")
    rows = torch.stack([li.flatten(), ti.flatten(), ki.flatten()], dim=1).to(dev)
    pos_of = torch.as_tensor(target.positions, device=dev)
    tok_of = torch.as_tensor(target.target_ids, device=dev)
    grads = torch.zeros_like(acts)
    chunks = range(0, rows.shape[0], batch_size)
    with frozen_parameters(adapter.model):
        for start in tqdm(chunks, desc="integrated gradients", disable=not progress, leave=False):
            chunk = rows[start : start + batch_size]
            _accumulate(adapter, target, point, layers, chunk, base, delta, alphas, pos_of, tok_of, grads)
    return (delta * grads / m).mean(dim=1).detach()


def _accumulate(adapter, target, point, layers, chunk, base, delta, alphas, pos_of, tok_of, grads) -> None:
    """One forward + backward pass over a chunk of rows; adds each row's gradient to
    ``grads[layer, token]``."""
    R = chunk.shape[0]
    lrow, trow, krow = chunk.unbind(1)
    leaves, hooks = [], []
    for s in torch.unique(lrow).tolist():
        sel = torch.nonzero(lrow == s).flatten()
        x = base[s, 0] + alphas[krow[sel], None] * delta[s, trow[sel]]  # [r_s, d_ff]
        leaf = x.detach().requires_grad_(True)
        leaves.append((s, sel, leaf))
        hooks.append((point, layers[s], _setter(sel, pos_of[trow[sel]], leaf)))
    # positions before the first target position are the same in every row: a causal model that can cache
    # them runs them once (hooks then see positions from `first` on)
    first = int(pos_of.min())
    cache = adapter.prefix_cache(target.ids[:, :first], R) if first > 0 else None
    shift = first if cache is not None else 0
    if shift:
        hooks = [(p, layer, _setter(sel, pos_of[trow[sel]] - shift, leaf))
                 for (p, layer, _), (_s, sel, leaf) in zip(hooks, leaves, strict=True)]
    ids = target.ids[:, shift:].expand(R, -1)
    with torch.enable_grad(), hooked(adapter, hooks):
        h = adapter.run(ids) if cache is None else adapter.run_cached(cache, ids)
        if h is None:
            raise InputError(
                "the forward pass was stopped early by a hook; integrated gradients needs the full pass")
        rix = torch.arange(R, device=h.device)
        lp = adapter.project(h[rix, pos_of[trow] - shift])
        prob = lp.float()[rix, tok_of[trow]].exp().sum()
        got = torch.autograd.grad(prob, [leaf for _, _, leaf in leaves])
    for (s, sel, _), g in zip(leaves, got, strict=True):
        grads[s].index_put_((trow[sel],), g.float(), accumulate=True)


def _setter(rows: torch.Tensor, positions: torch.Tensor, values: torch.Tensor):
    """Hook function: the activation of ``rows`` at ``positions`` becomes ``values`` (out of place)."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x.index_put((rows.to(x.device), positions.to(x.device)), values.to(x.dtype))

    return fn
