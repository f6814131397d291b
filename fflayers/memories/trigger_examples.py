"""Trigger examples of FFN keys: for every key, the k sentences on which it fires hardest.

For key ``i`` of layer ``l`` and a sentence, the score is the max over positions of the key's pre-activation
``a = fc1(LN(r))`` (hook point ``mlp_key``), with the argmax position (ties: first position). Every position
of the model input counts, the BOS position 0 included. Per key, the k sentences with the largest positive
score are kept (:class:`~fflayers.memories.topk.StreamingTopK`: larger value first, equal values by smaller
sentence id). Differences from the original code: sentences whose best activation is <= 0 are never listed
(the original padded the list with zero-valued entries), the order of equal values is fixed, and sentence
order does not depend on multiprocessing.

The pass is batched (length-bucketed batches of at most ``batch_tokens`` padded tokens) and stops after the
last requested layer's keys; each hooked layer is reduced to ``[batch, dims]`` maxima inside its hook, so
memory stays bounded by one layer's activations. The batches are the units of a run of
:mod:`fflayers.runs` (:class:`TriggerScan`, the scan of ``fflayers memories mine``): with ``checkpoint_dir``
as its run folder, each finished shard is saved and a rerun with the same model, sentences and settings
computes only the shards left.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.data.batching import pad_right
from fflayers.hooks import StopForward, hooked
from fflayers.memories.topk import StreamingTopK


@dataclass
class TriggerExamples:
    """Top-k trigger examples of the keys ``(layer, dim)`` for ``layer in layers``, ``dim in dims``.

    Buffers are ``[len(layers) * len(dims), k]`` (key index ``li * len(dims) + di``), on the CPU, best first;
    empty slots (fewer than k sentences with a positive activation) hold ``value=-inf``, ``sentence_id=-1``,
    ``position=-1``. ``position`` indexes the model input (0 = BOS when the sentences start with one).
    """

    values: torch.Tensor
    sentence_ids: torch.Tensor
    positions: torch.Tensor
    layers: list[int]
    dims: list[int]
    k: int
    n_sentences: int

    def key_index(self, layer: int, dim: int) -> int:
        """Row of key ``(layer, dim)`` in the buffers."""
        try:
            return self.layers.index(layer) * len(self.dims) + self.dims.index(dim)
        except ValueError:
            raise InputError(f"key ({layer}, {dim}) was not mined; mined layers {self.layers}, "
                               f"dims {len(self.dims)}") from None

    def examples(self, layer: int, dim: int) -> list[tuple[float, int, int]]:
        """``(value, sentence_id, position)`` of one key, best first (filled slots only)."""
        row = self.key_index(layer, dim)
        ids = self.sentence_ids[row].tolist()
        return [(v, s, p)
                for v, s, p in zip(self.values[row].tolist(), ids, self.positions[row].tolist(), strict=True)
                if s >= 0]

    def to_frame(self):
        """Long table: one row per filled slot, columns layer, dim, rank, sentence_id, position, value."""
        import pandas as pd

        n_dims, k = len(self.dims), self.k
        filled = (self.sentence_ids >= 0).numpy()
        key, rank = np.nonzero(filled)
        layers = np.asarray(self.layers, dtype=np.int64)[key // n_dims]
        dims = np.asarray(self.dims, dtype=np.int64)[key % n_dims]
        flat = key * k + rank
        return pd.DataFrame({
            "layer": layers,
            "dim": dims,
            "rank": rank.astype(np.int64),
            "sentence_id": self.sentence_ids.numpy().reshape(-1)[flat],
            "position": self.positions.numpy().reshape(-1)[flat],
            "value": self.values.numpy().reshape(-1)[flat],
        })

    def _repr_html_(self) -> str:
        """The :meth:`to_frame` table as HTML (how Jupyter shows the object)."""
        return self.to_frame()._repr_html_()

    def to_jsonl_rows(self, texts: Sequence[str]) -> Iterator[dict]:
        """Rows of the original JSONL schema, one per dim::

            {"dim": i,
             "top_values": [per layer: [{"rank", "layer_index", "token_indice", "fc1_value", "text"}]]}

        ``texts[sentence_id]`` is the sentence's text (space-joined tokens without BOS for word-level
        models).
        """
        if len(texts) < self.n_sentences:
            raise InputError(f"{len(texts)} texts for {self.n_sentences} mined sentences; pass one text "
                               "per sentence")
        n_dims = len(self.dims)
        values = self.values.tolist()
        ids = self.sentence_ids.tolist()
        pos = self.positions.tolist()
        for di, dim in enumerate(self.dims):
            per_layer = []
            for li, layer in enumerate(self.layers):
                row = li * n_dims + di
                per_layer.append([
                    {"rank": r, "layer_index": layer, "token_indice": p, "fc1_value": v, "text": texts[s]}
                    for r, (v, s, p) in enumerate(zip(values[row], ids[row], pos[row], strict=True)) if s >= 0
                ])
            yield {"dim": dim, "top_values": per_layer}


# ----- key selection -------------------------------------------------------------------------------------


def _check_selection(adapter: LMAdapter, layers: Sequence[int] | None,
                     dims: Sequence[int] | None) -> tuple[list[int], list[int]]:
    if layers is None:
        layers = list(range(adapter.n_layers))
    else:
        layers = list(dict.fromkeys(adapter.check_layer(int(layer)) for layer in layers))
        if not layers:
            raise InputError("no layers selected; pass layers=None for all layers")
    d_ff = adapter.d_ff
    if dims is None:
        dims = list(range(d_ff))
    else:
        dims = list(dict.fromkeys(int(d) for d in dims))
        if not dims:
            raise InputError("no dims selected; pass dims=None for all dims")
        bad = [d for d in dims if not 0 <= d < d_ff]
        if bad:
            raise InputError(f"dim {bad[0]} is out of range: the model has {d_ff} FFN dims per layer "
                               f"(0..{d_ff - 1})")
    return layers, dims


# ----- mining ----------------------------------------------------------------------------------------------


class _BatchReducer:
    """Hooks that reduce each selected layer's ``mlp_key`` to per-sentence max and argmax over positions."""

    def __init__(self, adapter: LMAdapter, layers: list[int], dims: list[int]) -> None:
        self.adapter = adapter
        self.layers = layers
        self.last = max(layers)
        dev = adapter.device
        self.dim_index = None if dims == list(range(adapter.d_ff)) else torch.tensor(dims, device=dev)
        self.n_dims = len(dims)
        self.pad = None
        self.min_len = 1
        self.arange: torch.Tensor | None = None
        self.out_v: torch.Tensor | None = None
        self.out_i: torch.Tensor | None = None

    def hooks(self):
        return [("mlp_key", layer, self._fn(li, layer == self.last)) for li, layer in enumerate(self.layers)]

    def _fn(self, li: int, last: bool):
        def fn(x: torch.Tensor):
            if self.dim_index is not None:
                x = x.index_select(-1, self.dim_index)
            v, i = self._max_argmax(x)
            self.out_v[li].copy_(v.T)
            self.out_i[li].copy_(i.T)
            if last:
                raise StopForward
            return None

        return fn

    def _max_argmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Max over real positions of ``x`` ``[B, T, F]`` and the first position holding it, both ``[B, F]``.

        ``amax`` plus a first-match search (vectorized) instead of ``max(dim)`` with indices (a slow strided
        reduction on CPU). Positions below the shortest length hold no padding, so only the (short:
        batches are length-bucketed) tail is masked.
        """
        m, T = self.min_len, x.shape[1]
        head = x[:, :m]
        tail = x[:, m:].masked_fill(self.pad[:, m:], float("-inf")) if m < T else None
        v = head.amax(dim=1)
        if tail is not None:
            v = torch.maximum(v, tail.amax(dim=1))
        v_ = v.unsqueeze(1)
        pos = self.arange[:, :m]
        i = torch.where(head == v_, pos, T).amin(dim=1)
        if tail is not None:
            i = torch.minimum(i, torch.where(tail == v_, self.arange[:, m:], T).amin(dim=1))
        return v, i

    def __call__(self, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per key ``[n_keys, B]`` max activation and argmax position of one right-padded batch."""
        dev = self.adapter.device
        self.min_len = max(1, int(attention_mask.sum(1).min()))  # on the host copy: no device sync
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev).bool()
        B = input_ids.shape[0]
        L = len(self.layers)
        self.pad = ~attention_mask[:, :, None]
        T = input_ids.shape[1]
        self.arange = torch.arange(T, device=dev,
                                   dtype=torch.int16 if T < 16_000 else torch.int32)[None, :, None]
        # [layer, dim, sentence]: row li * n_dims + di is key (layers[li], dims[di])
        self.out_v = torch.empty(L, self.n_dims, B, dtype=torch.float32, device=dev)
        self.out_i = torch.empty(L, self.n_dims, B, dtype=torch.int64, device=dev)
        self.adapter.run(input_ids, attention_mask)
        v, i = self.out_v.view(L * self.n_dims, B), self.out_i.view(L * self.n_dims, B)
        self.pad = self.out_v = self.out_i = self.arange = None
        return v, i


def autocast(adapter: LMAdapter, dtype: torch.dtype | None):
    """``torch.autocast`` on the adapter's device for ``dtype`` (bf16 / fp16), or a no-op for None."""
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=adapter.device.type, dtype=dtype)


def collate(sentences: Sequence[Sequence[int]], index: Sequence[int], pad_id: int, max_length: int | None):
    """Right-padded ``(input_ids, attention_mask)`` of ``sentences[i] for i in index`` (truncated to
    ``max_length``)."""
    return pad_right([list(sentences[i])[:max_length] if max_length else list(sentences[i]) for i in index],
                     pad_id)


class TriggerScan:
    """Trigger mining as a scan (:mod:`fflayers.memories.scan`): units are the length-bucketed batches of all
    sentences (fixed by the data and ``batch_tokens``), partial results :class:`StreamingTopK` s."""

    kind = "trigger_examples"

    def __init__(self, adapter: LMAdapter, sentences: Sequence[Sequence[int]], k: int, layers: list[int],
                 dims: list[int], batch_tokens: int, dtype: torch.dtype | None = None) -> None:
        from fflayers.data.batching import plan_batches, scan_batch_cap

        for i, s in enumerate(sentences):
            if len(s) == 0:
                raise InputError(f"sentence {i} is empty; drop empty sentences before mining")
        self.adapter, self.sentences, self.k = adapter, sentences, k
        self.layers, self.dims, self.dtype = layers, dims, dtype
        self.max_len = adapter.max_positions
        lengths = [min(len(s), self.max_len) if self.max_len else len(s) for s in sentences]
        self.batches = plan_batches(lengths, batch_tokens, max_batch_size=scan_batch_cap(len(lengths)))
        self.n_units = len(self.batches)

    def unit_weight(self, unit: int) -> int:
        """Number of sentences in unit (batch) ``unit``."""
        return len(self.batches[unit])

    def new_topk(self) -> StreamingTopK:
        """An empty top-k buffer for all selected keys, on the adapter's device."""
        return StreamingTopK(len(self.layers) * len(self.dims), self.k, device=self.adapter.device)

    def mine(self, units: Iterable[int], topk: StreamingTopK, progress=None) -> StreamingTopK:
        """Fold the batches ``units`` into ``topk``."""
        reducer = _BatchReducer(self.adapter, self.layers, self.dims)
        with (hooked(self.adapter, reducer.hooks()), torch.inference_mode(),
              autocast(self.adapter, self.dtype)):
            for u in units:
                index = self.batches[u]
                input_ids, mask = collate(self.sentences, index, self.adapter.vocab.pad_id, self.max_len)
                v, i = reducer(input_ids, mask)
                topk.update(v, i, torch.as_tensor(index, dtype=torch.int64))
                if progress is not None:
                    progress(len(index))
        return topk

    def run_units(self, units: range, progress: Callable[[int], object] | None = None) -> StreamingTopK:
        """The top-k of the batches ``units``; ``progress(n)`` is called after each batch of ``n``
        sentences."""
        return self.mine(units, self.new_topk(), progress)

    def merge(self, parts: list[StreamingTopK]) -> StreamingTopK:
        """Partial top-k merged into the first one."""
        out = parts[0]
        for part in parts[1:]:
            out.merge(part)
        return out

    def to_state(self, part: StreamingTopK) -> dict:
        """A partial result as saved state (its ``state_dict``)."""
        return part.state_dict()

    def from_state(self, state: dict) -> StreamingTopK:
        """A partial result from saved state, on the adapter's device."""
        return StreamingTopK.from_state_dict(state, device=self.adapter.device)

    def result(self, topk: StreamingTopK) -> TriggerExamples:
        """The final :class:`TriggerExamples` (buffers on the CPU)."""
        return TriggerExamples(topk.values.cpu(), topk.sentence_ids.cpu(), topk.positions.cpu(), self.layers,
                               self.dims, self.k, len(self.sentences))


def trigger_examples(
    adapter: LMAdapter,
    sentences: Sequence[Sequence[int]],
    k: int = 50,
    layers: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    batch_tokens: int = 4096,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    shard_size: int = 10_000,
    distributed: bool = False,
    dtype: torch.dtype | None = None,
) -> TriggerExamples:
    """Top-``k`` trigger examples of every key ``(layer, dim)`` over ``sentences`` (token ids, each exactly as
    the model reads it: BOS included where the model uses one; sentence id = index in ``sentences``).

    ``layers`` / ``dims`` (default: all) select keys. Sentences longer than the model's maximum are truncated.
    Batches are length-bucketed over all sentences; shards are runs of consecutive batches holding about
    ``shard_size`` sentences (at least four shards per rank when there are enough batches).
    ``checkpoint_dir``: the run folder (:mod:`fflayers.runs`: ``manifest.json`` and one file per finished
    shard); a rerun continues it, and one with another model, sentences or settings is refused
    (:class:`~fflayers.core.RunStateError` naming what differs). ``distributed=True`` (inside an initialised
    ``torch.distributed`` group; needed there): the ranks split the shards, and every rank returns the full
    result. ``dtype`` (``torch.bfloat16`` / ``torch.float16``): autocast the forward pass (faster on GPUs;
    activations are rounded, so near-equal activations can tie and then rank by sentence id).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k={k!r} must be a positive integer (the number of trigger examples per key)")
    if shard_size < 1:
        raise InputError(f"shard_size={shard_size} must be >= 1")
    if len(sentences) == 0:
        raise InputError("no sentences to mine; pass a non-empty list of token-id sequences")
    if batch_tokens < 1:
        raise InputError(f"batch_tokens={batch_tokens} must be >= 1; pass e.g. batch_tokens=4096")
    layers, dims = _check_selection(adapter, layers, dims)
    import torch.distributed as dist

    from fflayers.distributed import broadcast_from_main
    from fflayers.memories.scan import ScanConfig, run_scan
    from fflayers.runs import Workers, data_digest, model_fingerprint

    in_group = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if in_group else 1
    if distributed and not in_group:
        raise InputError("distributed=True needs an initialised torch.distributed process group (run "
                         "under torchrun)")
    if world > 1 and not distributed:
        raise InputError(f"trigger_examples is called inside a torch.distributed group of {world} ranks; "
                         "pass distributed=True (the ranks then split the work)")
    workers = Workers(rank=dist.get_rank(), world=world) if distributed else Workers()
    config = ScanConfig(TriggerScan.kind, layers, dims, len(sentences), k=k, batch_tokens=batch_tokens,
                        dtype=str(dtype))
    fingerprints = {"model": model_fingerprint(adapter), "data": data_digest(sentences)}
    done = run_scan(lambda bt: TriggerScan(adapter, sentences, k, layers, dims, bt, dtype), batch_tokens,
                    config, fingerprints, checkpoint_dir, workers, progress=progress,
                    desc="trigger examples", shard_sentences=shard_size)
    state = done.result.state_dict() if done.result is not None else None
    if world > 1:
        state = broadcast_from_main(state)
    return TriggerExamples(state["values"], state["sentence_ids"], state["positions"], layers, dims, k,
                           len(sentences))
