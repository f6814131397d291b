"""extract_ffn_info against a straightforward per-example, per-dim loop.

The reference re-runs the model on each whole sentence with plain torch hooks, takes ``r`` as
``block output - FFN output`` (pre-LN) or the FFN input (post-LN), and projects every ``m_i v_i`` on its own
through the head written out here. Integer columns must match exactly, up to genuine near-ties (a token within
``tol`` of the compared log-prob), which are accepted either way.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.backends.hf_arch import ARCHITECTURES
from fflayers.core import FflayersError
from fflayers.memories.ffn_info import DIM_COLUMNS, LAYER_COLUMNS, extract_ffn_info, homogeneous_head
from tests.fixtures.hf_models import VOCAB, tiny_model

SEED = 3


def _sentences(n=7, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [1, *torch.randint(2, 18, (n - 1,), generator=g).tolist()]  # the first one is too short
    return [torch.randint(1, vocab, (k,), generator=g).tolist() for k in lengths]


# ----- the reference ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Parts:
    blocks: list
    fc_in: list
    fc_out: list
    head: callable
    values: list  # [d_ff, d] per layer
    run: callable  # ids [T] -> None (full forward)
    time_first: bool
    post_ln: bool
    tol: float


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def hf_parts(model, final_norm=True) -> Parts:
    if model.config.model_type == "gpt2":
        blocks = list(model.transformer.h)
        fc_in = [b.mlp.c_fc for b in blocks]
        fc_out = [b.mlp.c_proj for b in blocks]
        values = [b.mlp.c_proj.weight.detach() for b in blocks]  # Conv1D: [d_ff, d]
        norm = model.transformer.ln_f
    else:  # llama
        blocks = list(model.model.layers)
        fc_in = [b.mlp.gate_proj for b in blocks]
        fc_out = [b.mlp.down_proj for b in blocks]
        values = [b.mlp.down_proj.weight.detach().T for b in blocks]
        norm = model.model.norm

    def head(h):
        return torch.log_softmax(model.lm_head(norm(h) if final_norm else h), dim=-1)

    def run(ids):
        model(input_ids=torch.tensor([ids]), use_cache=False)

    tol = 1e-9 if model.config.model_type == "gpt2" else 1e-6  # LlamaRMSNorm normalises in float32
    return Parts(blocks, fc_in, fc_out, head, values, run, False, False, tol)


def fairseq_parts(adapter) -> Parts:
    model = adapter.model
    dec = model.decoder
    blocks = list(dec.layers)

    def head(h):
        x = h.float()
        if dec.layer_norm is not None:
            x = dec.layer_norm(x)
        if dec.project_out_dim is not None:
            x = dec.project_out_dim(x)
        if dec.adaptive_softmax is not None:
            return model.get_normalized_probs((x[None], None), log_probs=True)[0]
        return torch.log_softmax(dec.output_projection(x), dim=-1)

    def run(ids):
        model(torch.tensor([ids]))

    return Parts(blocks, [b.fc1 for b in blocks], [b.fc2 for b in blocks], head,
                 [b.fc2.weight.detach().T for b in blocks], run, True, not blocks[0].normalize_before, 2e-4)


def expected_positions(lengths, seed):
    u = np.random.default_rng(seed).random(len(lengths))
    return [int(np.floor(u_k * (n - 1))) if n >= 2 else -1 for u_k, n in zip(u, lengths, strict=True)]


def capture_one(parts: Parts, ids, t) -> dict:
    """Run one whole sentence; block outputs, FFN outputs, coefficients and FFN inputs at position t."""
    cap: dict = {}
    handles = []

    def at_t(x):
        x = _first(x)
        return (x[t, 0] if parts.time_first else x[0, t]).detach().clone()

    def keep(name, layer, pre=False):
        if pre:
            return lambda module, args: cap.__setitem__((name, layer), at_t(args[0]))
        return lambda module, args, out: cap.__setitem__((name, layer), at_t(out))

    for layer, (block, fc_in, fc_out) in enumerate(zip(parts.blocks, parts.fc_in, parts.fc_out, strict=True)):
        handles.append(block.register_forward_hook(keep("block", layer)))
        handles.append(fc_out.register_forward_hook(keep("y", layer)))
        handles.append(fc_out.register_forward_pre_hook(keep("m", layer, pre=True)))
        handles.append(fc_in.register_forward_pre_hook(keep("in", layer, pre=True)))
    try:
        parts.run(ids)
    finally:
        for h in handles:
            h.remove()
    return cap


@torch.no_grad()
def reference(parts: Parts, sentences, seed):
    """Per sentence and layer: raw log-prob vectors and coefficients, computed one example and one dim at a
    time."""
    out = []
    positions = expected_positions([len(s) for s in sentences], seed)
    for k, ids in enumerate(sentences):
        t = positions[k]
        if t < 0:
            continue
        cap = capture_one(parts, ids, t)
        final_lp = parts.head(cap["block", len(parts.blocks) - 1][None])[0]
        for layer in range(len(parts.blocks)):
            y, m = cap["y", layer], cap["m", layer]
            r = cap["in", layer] if parts.post_ln else cap["block", layer] - y
            subs = [None if m[i] == 0 else parts.head((m[i] * parts.values[layer][i])[None])[0]
                    for i in range(len(m))]
            out.append(dict(sentence=k, position=t, next_token=ids[t + 1], layer=layer, final=final_lp,
                            r=parts.head(r[None])[0], y=parts.head(y[None])[0],
                            ry=parts.head((r + y)[None])[0],
                            m=m, subs=subs, r_norm=float(r.norm()), v_norm=parts.values[layer].norm(dim=1)))
    return out


# ----- tolerant comparisons ---------------------------------------------------------------------------------


def check_top1(top, lp, tol):
    """``top`` is an argmax of ``lp`` (up to ties within tol)."""
    assert lp[top] >= lp.max() - tol, (int(top), int(lp.argmax()))


def check_rank(rank, lp, target, tol):
    """``rank`` = #{lp > lp[target]} (any count between the strict and loose counts when near-ties exist)."""
    lo = int((lp > lp[target] + tol).sum())
    hi = int((lp > lp[target] - tol).sum()) - 1  # the target itself never counts
    assert lo <= rank <= hi, (rank, lo, hi)


def check_layer_table(df, ref, tol):
    assert list(df.columns) == LAYER_COLUMNS
    assert len(df) == len(ref)
    for row, e in zip(df.itertuples(index=False), ref, strict=True):
        assert (row.sentence, row.position, row.next_token, row.layer) == (e["sentence"], e["position"],
                                                                           e["next_token"], e["layer"])
        check_top1(row.final_top1, e["final"], tol)
        assert row.final_top1_prob == pytest.approx(float(e["final"].max().exp()), rel=1e-4, abs=1e-7)
        for name, lp in (("layer", e["ry"]), ("residual", e["r"]), ("ffn", e["y"])):
            check_top1(getattr(row, f"{name}_top1"), lp, tol)
            assert getattr(row, f"{name}_top1_prob") == pytest.approx(float(lp.max().exp()),
                                                                      rel=1e-4, abs=1e-7)
        for name, lp in (("residual", e["r"]), ("ffn", e["y"])):
            check_rank(getattr(row, f"{name}_final_rank"), lp, row.final_top1, tol)
            assert getattr(row, f"{name}_final_prob") == pytest.approx(float(lp[row.final_top1].exp()),
                                                                       rel=1e-4, abs=1e-7)
        check_rank(row.ffn_rank_of_residual_top1, e["y"], row.residual_top1, tol)
        assert row.top1_changed == (row.residual_top1 != row.layer_top1)
        m = e["m"]
        assert row.active_memories == int((m > 0).sum())
        sure = sum(1 for lp in e["subs"] if lp is not None and (lp > lp[row.layer_top1] - tol).sum() == 1)
        maybe = sum(1 for lp in e["subs"] if lp is not None and lp[row.layer_top1] >= lp.max() - tol)
        assert sure <= row.memories_agreeing <= maybe, (row.memories_agreeing, sure, maybe)
        assert row.residual_norm == pytest.approx(e["r_norm"], rel=1e-4)
        scaled = (m.abs() * e["v_norm"]).double()
        assert int((scaled > e["r_norm"] * (1 + 1e-4)).sum()) <= row.residual_norm_rank <= int(
            (scaled > e["r_norm"] * (1 - 1e-4)).sum())


def check_dim_table(df, ref, tol, dims=None):
    assert list(df.columns) == DIM_COLUMNS
    assert len(df) == len(ref)
    for row, e in zip(df.itertuples(index=False), ref, strict=True):
        dims_ = list(range(len(e["m"]))) if dims is None else dims
        assert df.attrs["dims"] == dims_
        assert (row.sentence, row.position, row.layer) == (e["sentence"], e["position"], e["layer"])
        check_top1(row.final_top1, e["final"], tol)
        check_top1(row.residual_top1, e["r"], tol)
        check_rank(row.residual_final_rank, e["r"], row.final_top1, tol)
        assert len(row.coefficients) == len(row.value_top1) == len(row.value_final_rank) == len(dims_)
        want = (e["m"] * e["v_norm"]).double().numpy()[dims_]
        np.testing.assert_allclose(row.coefficients, want, rtol=1e-4, atol=1e-6)
        for j, i in enumerate(dims_):
            lp = e["subs"][i]
            if lp is None:
                assert row.value_top1[j] == -1 and row.value_final_rank[j] == -1
            else:
                check_top1(row.value_top1[j], lp, tol)
                check_rank(row.value_final_rank[j], lp, row.final_top1, tol)


# ----- HuggingFace models -----------------------------------------------------------------------------------


def _double_adapter(arch, final_norm=True):
    model = tiny_model(arch).double()
    spec = ARCHITECTURES[arch] if final_norm else dataclasses.replace(ARCHITECTURES[arch], final_norm=None)
    return model, HFAdapter(model, device="cpu", spec=spec)


@pytest.mark.parametrize("arch,shortcut,kind", [("gpt2", None, "none"), ("llama", False, "none"),
                                                 ("llama", None, "sign-invariant")])
@pytest.mark.parametrize("mode", ["layer", "dim"])
def test_hf_matches_loop(arch, shortcut, kind, mode):
    """Final norms: LayerNorm with bias (GPT-2) takes the general path; RMSNorm (Llama) the sign-invariant
    shortcut, or the general path when it is switched off; all equal the per-example loop."""
    model, adapter = _double_adapter(arch)
    assert not homogeneous_head(adapter)
    sents = _sentences()
    df = extract_ffn_info(adapter, sents, mode, seed=SEED, batch_tokens=40, progress=False,
                          head_shortcut=shortcut)
    assert df.attrs["head_shortcut"] == kind
    parts = hf_parts(model)
    ref = reference(parts, sents, SEED)
    (check_layer_table if mode == "layer" else check_dim_table)(df, ref, parts.tol)
    assert 0 not in set(df["sentence"])  # too short: no rows


@pytest.mark.parametrize("shortcut", [None, False])
def test_homogeneous_head_shortcut_matches_loop(shortcut):
    """GPT-2 read without its final LayerNorm: a bias-free linear head, so the exact shortcut applies."""
    model, adapter = _double_adapter("gpt2", final_norm=False)
    assert homogeneous_head(adapter)
    sents = _sentences(seed=1)
    ref = reference(hf_parts(model, final_norm=False), sents, SEED)
    dims = [0, 5, 17, 63]
    dd = extract_ffn_info(adapter, sents, "dim", dims=dims, seed=SEED, progress=False, head_shortcut=shortcut)
    assert dd.attrs["head_shortcut"] == ("linear" if shortcut is None else "none")
    check_dim_table(dd, ref, 1e-9, dims=dims)
    dl = extract_ffn_info(adapter, sents, "layer", seed=SEED, progress=False, head_shortcut=shortcut)
    check_layer_table(dl, ref, 1e-9)


def test_layers_subset_batching_and_seed():
    model, adapter = _double_adapter("gpt2")
    sents = _sentences(n=9, seed=2)
    a = extract_ffn_info(adapter, sents, "layer", layers=[2, 0], seed=SEED, batch_tokens=4096, progress=False)
    b = extract_ffn_info(adapter, sents, "layer", layers=[0, 2], seed=SEED, batch_tokens=20,
                         block_sentences=2, progress=False)
    assert sorted(set(a["layer"])) == [0, 2]
    a, b = a.sort_values(["sentence", "layer"]), b.sort_values(["sentence", "layer"])
    for col in LAYER_COLUMNS:  # batching changes float rounding only
        if a[col].dtype.kind == "f":
            np.testing.assert_allclose(a[col], b[col], rtol=1e-9)
        else:
            np.testing.assert_array_equal(a[col], b[col])
    c = extract_ffn_info(adapter, sents, "layer", layers=[0], seed=SEED + 1, progress=False)
    want = expected_positions([len(s) for s in sents], SEED + 1)
    assert list(c["position"]) == [p for p in want if p >= 0]


def test_bad_inputs():
    _, adapter = _double_adapter("gpt2")
    with pytest.raises(FflayersError, match="no exact shortcut"):
        extract_ffn_info(adapter, _sentences(), "layer", head_shortcut=True, progress=False)
    with pytest.raises(FflayersError, match="mode"):
        extract_ffn_info(adapter, _sentences(), "layer-raw", progress=False)
    with pytest.raises(FflayersError, match="2 or more tokens"):
        extract_ffn_info(adapter, [[5], [6]], "layer", progress=False)
    with pytest.raises(FflayersError, match="dims"):
        extract_ffn_info(adapter, _sentences(), "dim", dims=[999], progress=False)
    with pytest.raises(FflayersError, match="out of range"):
        extract_ffn_info(adapter, _sentences(), "dim", layers=[7], progress=False)
    bert = HFAdapter(tiny_model("bert"), device="cpu")
    with pytest.raises(FflayersError, match="masked LM"):
        extract_ffn_info(bert, _sentences(), "layer", progress=False)


# ----- fairseq models (trained by the real CLIs) ------------------------------------------------------------


@pytest.mark.parametrize("which", ["fairseq_plain_lm", "fairseq_adaptive_lm"])
def test_fairseq_matches_loop(which, request):
    """Post-LN plain LM (r = FFN input; linear head: shortcut) and the pre-LN adaptive-softmax LM."""
    from fflayers.backends.fairseq_loading import load_fairseq_lm

    lm = request.getfixturevalue(which)
    adapter = load_fairseq_lm(lm.model_dir, device="cpu")
    lines = lm.valid.read_text().splitlines()[:6]
    sents = [adapter.vocab.tokenize(line) for line in lines]
    ref = reference(fairseq_parts(adapter), sents, SEED)
    kind = "linear" if which == "fairseq_plain_lm" else "adaptive"
    dims = list(range(0, adapter.d_ff, 3))
    for shortcut in (None, False):  # the exact shortcut, then the general path
        dl = extract_ffn_info(adapter, sents, "layer", seed=SEED, progress=False, head_shortcut=shortcut)
        assert dl.attrs["residual"] == ("ffn_input" if which == "fairseq_plain_lm" else "resid_pre+attn_out")
        assert dl.attrs["head_shortcut"] == (kind if shortcut is None else "none")
        check_layer_table(dl, ref, 2e-4)
        dd = extract_ffn_info(adapter, sents, "dim", dims=dims, seed=SEED, progress=False,
                              head_shortcut=shortcut)
        check_dim_table(dd, ref, 2e-4, dims=dims)


# ----- the scaled-head shortcut on a synthetic two-level softmax --------------------------------------------


@pytest.mark.parametrize("cutoff", [[5, 12, 30], [30]])
@pytest.mark.parametrize("m_scale", [3.0, 0.3, 0.02])  # large: exact sums; small: decided by the bounds
def test_scaled_subupdates_brute_force(cutoff, m_scale):
    """Adaptive-softmax-like head (shortlist 0..4, clusters 5..11 and 12..29) and a one-group head: top-1 and
    ranks of targets in every group (boundaries included), for positive, negative and zero coefficients."""
    from fflayers.memories.ffn_info import ScaledHead, _scaled_subupdates

    g = torch.Generator().manual_seed(0)
    d, n, S = 6, 9, 11
    sizes = [cutoff[0] + len(cutoff) - 1] + [b - a for a, b in zip(cutoff[:-1], cutoff[1:], strict=True)]
    mats = [torch.randn(k, d, generator=g, dtype=torch.float64) * 2 for k in sizes]
    head = ScaledHead(lambda h: [h @ w.T for w in mats], cutoff, "test")
    values = torch.randn(n, d, generator=g, dtype=torch.float64)
    m = torch.randn(S, n, generator=g, dtype=torch.float64) * m_scale
    m[0, :3] = 0.0
    m[1] = -m[1].abs()
    targets = torch.tensor([0, 4, 5, 11, 12, 29, 7, 20, 1, 3, 28][:S]) % cutoff[-1]
    top, rank = _scaled_subupdates(head, values, m, targets, max_elements=17)  # tiny tiles
    for s in range(S):
        for i in range(n):
            if m[s, i] == 0:
                assert top[s, i] == -1 and rank[s, i] == -1
                continue
            lp = head.compose(head.logits((m[s, i] * values[i])[None]))[0]
            assert torch.allclose(lp.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
            check_top1(top[s, i], lp, 1e-9)
            check_rank(int(rank[s, i]), lp, int(targets[s]), 1e-9)
