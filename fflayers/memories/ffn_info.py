"""Layer and value predictions at one random position per sentence (``--extract_ffn_info``, two modes).

Modes ``layer`` and ``dim``. Notation, for layer ``l`` at the chosen position: ``r`` is the residual the FFN
update is added to, ``m`` the coefficients (``mlp_coef``, the input of the FFN's output matrix), ``v_i`` the
values, ``y = sum_i m_i v_i + b`` the FFN output (``mlp_out``), and ``P(h) = adapter.project(h)`` the model's
own output head (final norm where the model has one, adaptive softmax in eval mode).

* Pre-LN sequential blocks (GPT-2, GPT-Neo, Llama, fairseq ``normalize_before``): ``r = resid_pre +
  attn_out``, the stream entering the FFN's LayerNorm; ``r + y`` is the layer output.
* Parallel blocks (GPT-J, GPT-NeoX): ``r = resid_pre + attn_out`` as well: what the FFN output is added to,
  so that ``r + y`` is the layer output (the FFN itself reads ``LN(resid_pre)``).
* Post-LN blocks (fairseq without ``normalize_before``): ``r`` is the FFN input (the attention sublayer's
  output after its LayerNorm) and ``r + y`` is the sum *before* the block's closing LayerNorm.

Positions: sentence ``k`` (token ids, BOS first where the model uses one) gets one position ``t`` drawn
uniformly from ``0 .. n_k - 2`` (``n_k`` = its length, capped at the model's maximum), with
``numpy.random.default_rng(seed)`` drawing one number per sentence in input order, so the choice does not
depend on batching. The hidden state at ``t`` predicts token ``t + 1`` (``next_token``). Sentences shorter
than 2 tokens have no such position and get no rows. The model's *final top-1* is the argmax of ``P`` of the
last block's output at ``t``. Only the prefix ``0..t`` is fed to the model (causal LMs: later tokens cannot
change position t).

Both modes return one row per ``(sentence, layer)``, sorted by sentence then layer; ranks count the tokens
with a strictly larger probability (0 = top-1); probabilities are ``exp`` of the head's log-probs.

``layer`` mode columns: ``sentence``, ``position``, ``next_token``, ``layer``, ``final_top1``,
``final_top1_prob``; ``layer_top1``/``layer_top1_prob`` (``P(r + y)``),
``residual_top1``/``residual_top1_prob`` (``P(r)``), ``ffn_top1``/``ffn_top1_prob`` (``P(y)``);
``residual_final_rank``/``residual_final_prob`` and ``ffn_final_rank``/``ffn_final_prob`` (rank and
probability of the final top-1 under ``P(r)`` / ``P(y)``); ``ffn_rank_of_residual_top1`` (rank of
``argmax P(r)`` under ``P(y)``); ``top1_changed`` (``argmax P(r) != argmax P(r + y)``); ``memories_agreeing``
(how many sub-updates ``m_i v_i`` with ``m_i != 0`` have the top-1 of ``P(r + y)``); ``active_memories``
(``#{m_i > 0}``); ``residual_norm`` (``||r||``) and ``residual_norm_rank`` (``#{i : |m_i| ||v_i|| > ||r||}``,
0 = the residual outweighs every single memory).

``dim`` mode columns: ``sentence``, ``position``, ``next_token``, ``layer``, ``final_top1``,
``residual_top1``, ``residual_final_rank``, and three numpy-array columns over the selected dims
(``df.attrs["dims"]``, default all): ``coefficients`` (``m_i ||v_i||``, float32), ``value_top1``
(``argmax P(m_i v_i)``) and ``value_final_rank`` (rank of the final top-1 under ``P(m_i v_i)``). A zero
coefficient makes ``m_i v_i`` the zero vector, whose projection says nothing about the value: there
``value_top1`` and ``value_final_rank`` are -1 (only ReLU models have exact zeros). This wide layout keeps
1000 sentences of the 16-layer, 4096-dim WikiText-103 model at ~0.8 GB, where a long table (one row per
value) would need tens of GB.

``df.attrs`` records ``mode``, ``dims``, ``d_ff``, ``seed``, ``layers``, ``residual`` (which definition of
``r`` was used) and ``head_shortcut``; :func:`ffn_info_by_layer` summarises a layer-mode table per layer.

Speed: the model runs once per batch of sentences; activations are gathered at the chosen positions by hooks
(``resid_pre``, ``attn_out``, ``mlp_coef``, ``mlp_out``). Sub-update predictions ``P(m_i v_i)`` are computed
for all sentences of a block and all values of a layer in batched chunks (``max_chunk_elements`` log-probs at
a time). Exact shortcuts (:func:`scaled_head`, verified numerically against ``adapter.project`` before use):

* homogeneous head (``logits(c h) = c logits(h)``: a bias-free linear output layer and no final norm, e.g.
  fairseq's plain ``transformer_lm``): ``log P(m v) = log_softmax(m log P(v))``. Each value is projected once
  per block; ``argmax P(m v)`` is ``argmax P(v)`` (``m > 0``) or ``argmin P(v)`` (``m < 0``) and ranks are
  counts of larger (smaller) log-probs of ``P(v)``: no per-sentence work over the vocabulary at all.
* fairseq adaptive softmax without a final norm (the WikiText-103 model): head and tail logits are linear in
  ``h``, so they are computed once per value and block; per (value, sentence) pair no matrix product is
  needed, only the tail clusters' ``logsumexp(m z)``, and only where cheap bounds on it leave the top-1 or a
  rank count undecided (see :func:`~fflayers.memories.ffn_info_projections.scaled_subupdates`).

* sign-invariant head (RMSNorm without bias followed by a bias-free linear head: Llama-style models such as
  SmolLM2): ``P(m v)`` orders tokens as ``sign(m) log P(v)``, and sub-update top-1s and ranks need nothing
  more, so the linear shortcut above applies to them (:func:`sign_invariant_head`).

Other heads with a final norm (GPT-2 and GPT-NeoX's LayerNorm with bias, fairseq pre-LN with a final
LayerNorm) use the general path: every ``m_i v_i`` goes through the head, in batched chunks. Results agree
with the general path up to floating-point rounding at near-ties.

Code: this module gathers the activations and runs the scan (:class:`FfnInfoScan`, :func:`extract_ffn_info`);
:mod:`~fflayers.memories.ffn_info_layers` and :mod:`~fflayers.memories.ffn_info_dims` build the rows of each
mode (column layouts in :mod:`~fflayers.memories.ffn_info_columns`), :mod:`~fflayers.memories.ffn_info_heads`
finds the exact shortcut heads and :mod:`~fflayers.memories.ffn_info_projections` projects vectors and
sub-updates through the head. The column layouts, the shortcut heads and :func:`ffn_info_by_layer` are
importable from here as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fflayers.backends.base import LMAdapter
from fflayers.core import InputError
from fflayers.hooks import hooked
from fflayers.memories.ffn_info_columns import DIM_COLUMNS, LAYER_COLUMNS
from fflayers.memories.ffn_info_dims import reduce_dim
from fflayers.memories.ffn_info_heads import ScaledHead, homogeneous_head, scaled_head, sign_invariant_head
from fflayers.memories.ffn_info_layers import ffn_info_by_layer, reduce_layer
from fflayers.memories.ffn_info_projections import scaled_subupdates
from fflayers.memories.value_projections import full_precision
from fflayers.runs.accumulators import PiecesTask, UnitPieces

__all__ = ["extract_ffn_info", "ffn_info_by_layer", "choose_positions", "homogeneous_head", "scaled_head",
           "sign_invariant_head", "ScaledHead", "LAYER_COLUMNS", "DIM_COLUMNS", "FfnInfoScan"]

_scaled_subupdates = scaled_subupdates  # importable under its private name as well


def choose_positions(lengths: Sequence[int], seed: int = 0, max_positions: int | None = None) -> np.ndarray:
    """One position per sentence, uniform in ``0 .. n - 2`` (``n`` capped at ``max_positions``); -1 when
    ``n < 2``."""
    n = np.asarray(lengths, dtype=np.int64)
    if max_positions is not None:
        n = np.minimum(n, int(max_positions))
    u = np.random.default_rng(seed).random(len(n))
    pos = np.floor(u * np.maximum(n - 1, 0)).astype(np.int64)
    pos = np.minimum(pos, np.maximum(n - 2, 0))
    pos[n < 2] = -1
    return pos


def _is_post_ln(adapter: LMAdapter) -> bool:
    post = getattr(adapter, "post_ln", None)
    if isinstance(post, bool):
        return post
    before = getattr(adapter, "normalize_before", None)
    return isinstance(before, bool) and not before


def _gather_forward(adapter: LMAdapter, batch, layers: list[int], post_ln: bool) -> dict:
    """One forward pass; activations at each row's last real token: ``{name: [L', B, .]}`` plus
    ``final [B, d]``."""
    ids, mask = batch.input_ids.to(adapter.device), batch.attention_mask.to(adapter.device)
    pos = mask.sum(1) - 1
    rows = torch.arange(ids.shape[0], device=adapter.device)
    store: dict = {}

    def saver(key):
        def fn(x: torch.Tensor):
            store[key] = x[rows, pos].detach().to(adapter.dtype)  # autocast: back to the model's dtype
            return None

        return fn

    # post-LN: r = the FFN input (mlp_in); otherwise the stream entering the FFN's norm
    points = (("mlp_in", "mlp_coef", "mlp_out") if post_ln
              else ("resid_pre", "attn_out", "mlp_coef", "mlp_out"))
    with hooked(adapter, [(p, layer, saver((p, layer))) for p in points for layer in layers]):
        h = adapter.run(ids, mask)
    if h is None:
        raise InputError("the forward pass stopped early; remove stop_early hooks before extracting ffn "
                           "info")

    def stack(name):
        return torch.stack([store[name, layer] for layer in layers])

    r = stack("mlp_in") if post_ln else stack("resid_pre") + stack("attn_out")
    return {"final": h[rows, pos].detach().to(adapter.dtype), "r": r, "y": stack("mlp_out"),
            "m": stack("mlp_coef")}


class FfnInfoScan(PiecesTask):
    """FFN info as a scan (:mod:`fflayers.memories.scan`): units are blocks of length-bucketed batches of the
    sentences' prefixes (fixed by the data, ``batch_tokens`` and ``block_sentences``); partial results are
    :class:`fflayers.runs.UnitPieces` of row blocks, sorted by sentence then layer in :meth:`result`."""

    kind = "ffn_info"

    def __init__(self, adapter: LMAdapter, sentences: Sequence[Sequence[int]], mode: str,
                 layers: Iterable[int] | None = None, dims: Iterable[int] | None = None, seed: int = 0,
                 batch_tokens: int = 4096, block_sentences: int = 512, max_chunk_elements: int = 1 << 24,
                 head_shortcut: bool | None = None, dtype: torch.dtype | None = None) -> None:
        from fflayers.data.batching import plan_batches, scan_batch_cap
        from fflayers.runs import group_units

        if mode not in ("layer", "dim"):
            raise InputError(f"unknown extract mode {mode!r}; use 'layer' or 'dim'")
        if adapter.is_masked_lm:
            raise InputError("ffn info needs a causal LM (the position t predicts token t+1); this model "
                               "is a masked LM")
        if batch_tokens < 1 or block_sentences < 1:
            raise InputError(f"batch_tokens={batch_tokens} and block_sentences={block_sentences} must be "
                               ">= 1")
        self.adapter, self.mode, self.seed, self.dtype = adapter, mode, seed, dtype
        self.layers = adapter.check_layers(layers)
        d_ff = adapter.d_ff
        if mode == "dim":
            self.dim_list = list(range(d_ff)) if dims is None else sorted({int(d) for d in dims})
            if not self.dim_list or self.dim_list[0] < 0 or self.dim_list[-1] >= d_ff:
                raise InputError(f"dims must be a non-empty subset of 0..{d_ff - 1}")
        else:
            self.dim_list = list(range(d_ff))
        self.seqs = [list(map(int, s)) for s in sentences]
        self.positions = choose_positions([len(s) for s in self.seqs], seed, adapter.max_positions)
        self.keep = [k for k in range(len(self.seqs)) if self.positions[k] >= 0]
        if not self.keep:
            raise InputError("no sentence has 2 or more tokens; pass tokenized sentences (BOS + words)")
        self.prefixes = [self.seqs[k][: self.positions[k] + 1] for k in self.keep]
        self.shortcut = None if head_shortcut is False else scaled_head(adapter)
        if head_shortcut is True and self.shortcut is None:
            raise InputError("head_shortcut=True, but this model's head has no exact shortcut (final norm "
                               "or bias); pass head_shortcut=None")
        self.post_ln = _is_post_ln(adapter)
        self.max_chunk_elements = max_chunk_elements
        self.batches = plan_batches([len(p) for p in self.prefixes], batch_tokens,
                                    max_batch_size=scan_batch_cap(len(self.prefixes)))
        # blocks of at least `block` sentences: at least 8 of them when there are a few hundred sentences, so
        # that a sharded run has work for every worker; fixed by the data only, so any sharding computes the
        # same blocks
        block = min(block_sentences, max(64, -(-len(self.prefixes) // 8)))
        self.blocks = group_units([len(b) for b in self.batches], block)
        self.n_units = len(self.blocks)
        self._values: dict | None = None

    def unit_weight(self, unit: int) -> int:
        """Number of sentences in unit ``unit``."""
        return sum(len(self.batches[b]) for b in self.blocks[unit])

    def _weights(self):
        if self._values is None:
            dev = self.adapter.device
            with torch.no_grad():
                values = {layer: self.adapter.ffn_values(layer).detach().to(dev) for layer in self.layers}
                norms = {layer: full_precision(values[layer]).norm(dim=1) for layer in self.layers}
            self._values = (values, norms, torch.as_tensor(self.dim_list, dtype=torch.long, device=dev))
        return self._values

    def run_units(self, units: range, progress: Callable[[int], object] | None = None) -> UnitPieces:
        """Rows of the units ``units``, one block each; ``progress(n)`` is called after each batch of ``n``
        sentences."""
        from fflayers.data.batching import Batch
        from fflayers.memories.trigger_examples import autocast, collate

        adapter, seqs, keep, positions = self.adapter, self.seqs, self.keep, self.positions
        values, norms, dim_idx = self._weights()
        reduce = reduce_layer if self.mode == "layer" else reduce_dim
        out = UnitPieces()
        with torch.no_grad():
            for unit in units:
                pending = []
                for b in self.blocks[unit]:
                    index = self.batches[b]
                    batch = Batch(*collate(self.prefixes, index, adapter.vocab.pad_id, None), list(index))
                    with autocast(adapter, self.dtype):
                        pending.append((index, _gather_forward(adapter, batch, self.layers, self.post_ln)))
                    if progress is not None:
                        progress(len(index))
                idx = [keep[i] for ix, _ in pending for i in ix]
                g = {name: torch.cat([p[name] for _, p in pending], dim=0 if name == "final" else 1)
                     for name in ("final", "r", "y", "m")}
                meta = (np.asarray(idx), positions[idx], np.asarray([seqs[k][positions[k] + 1] for k in idx]))
                out.add(unit, reduce(adapter, g, self.layers, values, norms, dim_idx, meta, self.shortcut,
                                     self.max_chunk_elements))
        return out

    def result(self, pieces: UnitPieces) -> pd.DataFrame:
        """The final table: rows by sentence then layer, columns in order and ``df.attrs`` (see
        :func:`extract_ffn_info`)."""
        df = pd.concat(pieces.pieces(), ignore_index=True).sort_values(["sentence", "layer"], kind="stable")
        df = df.reset_index(drop=True)[LAYER_COLUMNS if self.mode == "layer" else DIM_COLUMNS]
        df.attrs.update({"mode": self.mode, "dims": self.dim_list if self.mode == "dim" else None,
                         "d_ff": self.adapter.d_ff, "seed": self.seed, "layers": self.layers,
                         "residual": "ffn_input" if self.post_ln else "resid_pre+attn_out",
                         "head_shortcut": self.shortcut.kind if self.shortcut else "none"})
        return df


def extract_ffn_info(
    adapter: LMAdapter,
    sentences: Sequence[Sequence[int]],
    mode: str,
    layers: Iterable[int] | None = None,
    dims: Iterable[int] | None = None,
    seed: int = 0,
    batch_tokens: int = 4096,
    progress: bool = True,
    block_sentences: int = 512,
    max_chunk_elements: int = 1 << 24,
    head_shortcut: bool | None = None,
    dtype: torch.dtype | None = None,
) -> pd.DataFrame:
    """Layer- or dim-level FFN information at one random position per sentence (see the module docstring).

    ``sentences``: token-id lists (BOS first where the model uses one). ``dims`` selects values in ``dim``
    mode (ignored in ``layer`` mode, whose counts use all values). Up to ``block_sentences`` sentences (fewer
    on small runs: at least 8 blocks from 512 sentences on) are gathered before their sub-updates are
    projected; ``max_chunk_elements`` bounds the log-probs alive per projection chunk.
    ``head_shortcut``: None uses the exact shortcut when :func:`scaled_head` finds one, False never, True
    requires it. ``dtype`` (``torch.bfloat16`` / ``torch.float16``): autocast the forward pass; projections
    stay in full precision. (:class:`FfnInfoScan` with :mod:`fflayers.memories.scan` runs the same over
    torchrun ranks and job arrays.)
    """
    task = FfnInfoScan(adapter, sentences, mode, layers, dims, seed, batch_tokens, block_sentences,
                       max_chunk_elements, head_shortcut, dtype)
    bar = tqdm(total=len(task.prefixes), desc=f"ffn info ({mode})", disable=not progress)
    pieces = task.run_units(range(task.n_units), bar.update)
    bar.close()
    return task.result(pieces)
