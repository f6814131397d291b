"""Least-squares linear maps between states, from streamed Gram matrices.

The map from state i to state j (i < j) minimises ``||X_j - X_i @ A.T||^2`` over the fitted positions:
``A = (G_i^{-1} C_ij)^T`` with ``G_i = X_i^T X_i`` and ``C_ij = X_i^T X_j``. :class:`GramAccumulator` sums
these products over batches in float64, so the stacked data never needs to be held and the result does not
depend on how the rows were batched. No intercept is fitted (as in the paper).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError

#: G_i with a larger condition number (largest / smallest eigenvalue) is refused when ridge == 0.
MAX_CONDITION = 1e12

Maps = dict[tuple[int, int], torch.Tensor]
_KEY = re.compile(r"^A_(\d+)_(\d+)$")


class GramAccumulator:
    """Running sums ``X_i^T X_j`` (``i <= j``) over rows of states ``[b, n_states, d]``, in float64 on
    ``device``.

    Block row ``i`` is one ``[d, (n_states - i) * d]`` tensor (``G_i`` first, then ``C_ij`` for ``j > i``),
    filled by one matrix product per state and batch. Memory: ``n_states * (n_states + 1) / 2 * d^2`` doubles.
    """

    def __init__(self, n_states: int, d: int, device: torch.device | str | None = None,
                 allocate: bool = True) -> None:
        if n_states < 2 or d < 1:
            raise InputError(
                f"need at least 2 states and d >= 1 for linear maps, got n_states={n_states}, d={d}")
        self.n_states = int(n_states)
        self.d = int(d)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.n = 0
        width = d if allocate else 0  # not allocated: for load_state_dict
        self.blocks = [torch.zeros(width, (n_states - i) * width, dtype=torch.float64, device=self.device)
                       for i in range(n_states)]

    def update(self, states: torch.Tensor) -> None:
        """Add the rows of ``states`` ``[b, n_states, d]``."""
        S, d = self.n_states, self.d
        if states.dim() != 3 or tuple(states.shape[1:]) != (S, d):
            raise InputError(f"states of shape {tuple(states.shape)} do not fit an accumulator of "
                             f"[b, {S}, {d}]; pass [positions, states, d] batches of the model "
                             "the accumulator was made for")
        x = states.detach().to(self.device, torch.float64)
        if not torch.isfinite(x).all():
            raise InputError("states contain NaN or inf values; check the model's dtype (fp16 overflow?)")
        b = x.shape[0]
        for i in range(S):
            self.blocks[i].addmm_(x[:, i].T, x[:, i:].reshape(b, (S - i) * d))
        self.n += b

    def add(self, states: torch.Tensor) -> None:
        """:meth:`update` (the name of the state protocol of :mod:`fflayers.runs.accumulators`)."""
        self.update(states)

    def merge(self, other: GramAccumulator) -> None:
        """Add the sums of ``other`` (same ``n_states`` and ``d``). The same sums as one accumulator fed all
        the rows up to float rounding; the fit folds rows in order instead
        (:mod:`fflayers.shortcuts.passes`)."""
        if (other.n_states, other.d) != (self.n_states, self.d):
            raise InputError(f"cannot merge Gram sums of [{other.n_states}, {other.d}] states into "
                             f"[{self.n_states}, {self.d}]")
        for mine, theirs in zip(self.blocks, other.blocks, strict=True):
            mine += theirs.to(self.device)
        self.n += other.n

    def state_dict(self) -> dict:
        """The sums and count (the tensors themselves, on :attr:`device`: not a copy)."""
        return {"n_states": self.n_states, "d": self.d, "n": self.n, "blocks": list(self.blocks)}

    def load_state_dict(self, state: Mapping) -> None:
        """Take the sums of :meth:`state_dict` (of an accumulator of the same ``n_states`` and ``d``)."""
        if (int(state["n_states"]), int(state["d"])) != (self.n_states, self.d):
            raise InputError(f"a Gram state of [{state['n_states']}, {state['d']}] states does not fit "
                             f"[{self.n_states}, {self.d}]")
        self.blocks = [b.to(self.device, torch.float64) for b in state["blocks"]]
        self.n = int(state["n"])

    def gram(self, i: int) -> torch.Tensor:
        """``G_i = X_i^T X_i`` ``[d, d]``."""
        return self.blocks[i][:, : self.d]

    def cross(self, i: int, j: int) -> torch.Tensor:
        """``C_ij = X_i^T X_j`` ``[d, d]`` for ``i <= j``."""
        k = j - i
        return self.blocks[i][:, k * self.d : (k + 1) * self.d]


def _check_pairs(acc: GramAccumulator, pairs: Iterable[tuple[int, int]] | None) -> list[tuple[int, int]]:
    S = acc.n_states
    if pairs is None:
        return [(i, j) for i in range(S) for j in range(i + 1, S)]
    out = []
    for pair in pairs:
        i, j = (int(v) for v in pair)
        if i >= j:
            raise InputError(f"pair (i={i}, j={j}): maps go from an earlier state i to a later state j; "
                               "pass pairs as (i, j) with i < j")
        if not 0 <= i < j < S:
            raise InputError(f"pair (i={i}, j={j}) is out of range: states are 0..{S - 1}")
        out.append((i, j))
    if not out:
        raise InputError("no pairs to fit; pass pairs=None for all i < j")
    return list(dict.fromkeys(out))


def _ridged(G: torch.Tensor, ridge: float) -> torch.Tensor:
    """``G + ridge * mean(diag(G)) * I``: the penalty scales with the state's size (scale-free ``ridge``)."""
    scale = float(G.diagonal().mean()) or 1.0
    return G + ridge * scale * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def _factor(G: torch.Tensor, n: int, ridge: float, what: str) -> torch.Tensor | None:
    """Cholesky factor of ``G`` (ridged: :func:`_ridged`); None when it is not positive definite (ridge > 0
    only). Without ridge, :class:`~fflayers.core.InputError` for fewer rows than dims or an ill-conditioned
    ``G`` (``what`` names it)."""
    d = G.shape[0]
    if ridge == 0:
        if n < d:
            raise InputError(
                f"underdetermined: {n} positions for d = {d} dims; use more sentences or pass --ridge")
        eig = torch.linalg.eigvalsh(G)
        cond = float(eig[-1] / eig[0]) if eig[0] > 0 else float("inf")
        if not cond <= MAX_CONDITION:
            raise InputError(f"X^T X of {what} is singular or ill-conditioned (condition number {cond:.2e}); "
                               "use more (varied) sentences or pass --ridge")
    else:
        G = _ridged(G, ridge)
    L, info = torch.linalg.cholesky_ex(G)
    return L if int(info) == 0 else None


def _solve(G: torch.Tensor, L: torch.Tensor | None, C: torch.Tensor, ridge: float) -> torch.Tensor:
    """``A`` with ``A.T = G^-1 C`` from the factor ``L`` (pseudo-inverse of the ridged ``G`` when None)."""
    sol = (torch.cholesky_solve(C, L) if L is not None
           else torch.linalg.pinv(_ridged(G, ridge), hermitian=True) @ C)
    return sol.T.to("cpu", torch.float32).contiguous()


def solve_least_squares(G: torch.Tensor, C: torch.Tensor, n: int, ridge: float = 0.0,
                        what: str = "the inputs") -> torch.Tensor:
    """The map ``A`` ``[d_out, d_in]`` (float32, CPU) minimising ``sum ||y - A x||^2`` (+ ridge) from
    ``G = X^T X`` and ``C = X^T Y`` over ``n`` rows; checks as in :func:`fit_maps`."""
    ridge = float(ridge)
    if not ridge >= 0:
        raise InputError(f"ridge={ridge} must be >= 0")
    return _solve(G, _factor(G, n, ridge, what), C, ridge)


def fit_maps(acc: GramAccumulator, ridge: float = 0.0,
             pairs: Iterable[tuple[int, int]] | None = None) -> Maps:
    """Maps ``{(j, i): A}`` with ``A`` ``[d, d]`` float32 on the CPU, for ``pairs`` of ``(i, j)``, ``i < j``
    (None: all). ``ridge * mean(diag(G_i))`` is added to the diagonal of ``G_i``: ``ridge`` is relative to the
state's scale (residual streams grow by orders of magnitude across layers), e.g. 1e-3.

    Without ridge, :class:`~fflayers.core.InputError` when there are fewer positions than dims or ``G_i`` is
    singular or ill-conditioned (condition number above :data:`MAX_CONDITION`).
    """
    ridge = float(ridge)
    if not ridge >= 0:
        raise InputError(f"ridge={ridge} must be >= 0")
    if acc.n == 0:
        raise InputError("the accumulator has seen no positions; call update() with states first")
    by_i: dict[int, list[int]] = {}
    for i, j in _check_pairs(acc, pairs):
        by_i.setdefault(i, []).append(j)
    maps: Maps = {}
    for i, js in sorted(by_i.items()):
        G = acc.gram(i)
        # None: ridge too small for a positive definite G_i in floats
        L = _factor(G, acc.n, ridge, f"state {i}")
        for j in js:
            maps[j, i] = _solve(G, L, acc.cross(i, j), ridge)
    return maps


def apply_map(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ A.T`` for row vectors ``x`` ``[..., d]`` (``A`` is moved to ``x``'s device and dtype)."""
    return x @ A.to(x.device, x.dtype).T


# ----- files ------------------------------------------------------------------------------------------------


def model_id(adapter: LMAdapter) -> str:
    """Device-free description of a model, stored with maps and compared on load."""
    name = getattr(getattr(getattr(adapter, "model", None), "config", None), "_name_or_path", "") or ""
    return (f"{type(adapter).__name__}(family={adapter.family!r}, name={name!r}, layers={adapter.n_layers}, "
            f"d_model={adapter.d_model}, d_ff={adapter.d_ff}, vocab={adapter.vocab_size})")


def maps_metadata(adapter: LMAdapter, data_hash: str, seed: int, n_positions: int,
                  ridge: float) -> dict[str, str]:
    """The metadata :func:`save_maps` stores and :func:`load_maps` checks."""
    return {"model": model_id(adapter), "d_model": str(adapter.d_model),
            "n_states": str(adapter.n_layers + 1), "data_hash": str(data_hash), "seed": str(seed),
            "positions": str(n_positions), "ridge": str(ridge)}


def save_maps(path: str | os.PathLike, maps: Mapping[tuple[int, int], torch.Tensor],
              metadata: Mapping[str, str]) -> None:
    """Write maps as safetensors ``A_{j}_{i}`` ``[d, d]`` with string ``metadata`` (atomically).

    ``d_model`` and ``n_states`` are filled in from the maps when ``metadata`` lacks them.
    """
    from safetensors.torch import save

    from fflayers.io import atomic_write

    if not maps:
        raise InputError("no maps to save; fit them first (fit_maps)")
    shapes = {tuple(A.shape) for A in maps.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or len(set(next(iter(shapes)))) != 1:
        raise InputError(f"maps must all be square [d, d] of one size, got shapes {sorted(shapes)}")
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.setdefault("d_model", str(next(iter(shapes))[0]))
    meta.setdefault("n_states", str(max(j for j, _ in maps) + 1))
    tensors = {f"A_{int(j)}_{int(i)}": A.detach().to("cpu", torch.float32).contiguous()
               for (j, i), A in maps.items()}
    with atomic_write(path, "wb") as f:
        f.write(sorted_metadata(save(tensors, metadata=meta)))


def sorted_metadata(payload: bytes) -> bytes:
    """A safetensors file's bytes with the metadata keys in sorted order (the writer orders them at random),
    so that the same maps and metadata make the same file."""
    import json

    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])
    meta = header.pop("__metadata__", None)
    ordered = ({} if meta is None else {"__metadata__": dict(sorted(meta.items()))}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # another JSON spelling than the writer's: keep its bytes
        return payload
    return payload[:8] + text.ljust(size, b" ") + payload[8 + size :]


def read_safetensors(path: Path, what: str,
                     missing_hint: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file; one-line :class:`~fflayers.core.InputError` when it
    is missing (``missing_hint`` says what to do) or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        raise InputError(f"{what} {path} does not exist; {missing_hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise InputError(f"{what} {path} is not a readable safetensors file ({type(err).__name__}); "
                         "refit the maps") from None


def load_maps(path: str | os.PathLike, adapter: LMAdapter | None = None) -> tuple[Maps, dict[str, str]]:
    """Maps and metadata written by :func:`save_maps`; with ``adapter``, :class:`~fflayers.core.InputError`
    unless they were fitted for the same model (``model`` metadata), ``d_model`` and number of states."""
    path = Path(path)
    tensors, meta = read_safetensors(path, "maps file", "fit the maps first or give the right path")
    maps: Maps = {}
    for name, A in tensors.items():
        m = _KEY.match(name)
        if m is None or A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise InputError(
                f"maps file {path} holds an unexpected tensor {name} {tuple(A.shape)}; refit the maps")
        j, i = int(m.group(1)), int(m.group(2))
        if i >= j:
            raise InputError(
                f"maps file {path} holds a map {name} from a later to an earlier state; refit the maps")
        maps[j, i] = A
    if adapter is not None:
        d, S = adapter.d_model, adapter.n_layers + 1
        d_file = str(meta.get("d_model", next(iter(maps.values())).shape[0] if maps else d))
        if not d_file.isdigit() or not str(meta.get("n_states", S)).isdigit():
            raise InputError(f"maps file {path} has unreadable d_model / n_states metadata; refit the maps")
        d_file = int(d_file)
        if d_file != d:
            raise InputError(f"maps in {path} were fitted for d_model = {d_file}, this model has {d}; "
                             "fit maps for this model")
        if "n_states" in meta and int(meta["n_states"]) != S:
            raise InputError(f"maps in {path} were fitted for {meta['n_states']} states, this model has {S}; "
                               "fit maps for this model")
        if "model" in meta and meta["model"] != model_id(adapter):
            raise InputError(f"maps in {path} were fitted for {meta['model']}, not {model_id(adapter)}; "
                               "fit maps for this model")
    return maps, meta
