"""Submodule maps and the shortcuts that run the model with one kind of submodule replaced by its map."""

import numpy as np
import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.hooks import capture
from fflayers.shortcuts import Position, sample_positions
from fflayers.shortcuts.submodules import (
    CHAINS,
    evaluate_submodule_shortcuts,
    fit_submodule_maps,
    load_submodule_maps,
    save_submodule_maps,
    submodule_log_probs,
    submodule_r2,
)
from tests.fixtures.hf_models import VOCAB, tiny_model


def _one_token_positions(n=VOCAB - 1):
    """Sequences of one token: attention then reads only its own position (an affine map of its input)."""
    return [Position(i, 0, (1 + i,), 0) for i in range(n)]


def _random_positions(adapter, n=120, seed=0):
    """Random token sequences, one sampled position each (masked LMs: id 3 plays the mask)."""
    g = torch.Generator().manual_seed(seed)
    sents = [torch.randint(1, VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n)]
    return sample_positions(adapter, sents, seed=seed, mask_id=3 if adapter.is_masked_lm else None)


def _zero_attention_biases(model, arch):
    with torch.no_grad():
        for name, p in model.named_parameters():
            inside_attn = ".attn." in name or ".attention." in name or ".self_attn." in name
            if inside_attn and name.endswith("bias") and p.dim() == 1:
                p.zero_()
    return model


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "gptj", "gpt_neox", "llama"])
def test_mat_attn_equals_model_when_attention_is_linear(arch):
    """One-token inputs and no attention biases: attention is exactly linear on the data, so its fitted map
    reproduces it and the mat_attn shortcut from every layer equals the real model."""
    adapter = HFAdapter(_zero_attention_biases(tiny_model(arch), arch), device="cpu")
    pos = _one_token_positions()
    maps = fit_submodule_maps(adapter, pos, batch_size=40, ridge=1e-9)
    ids = torch.tensor([[p.input_ids[0]] for p in pos])
    with torch.no_grad():
        want = adapter.log_probs(ids)[:, 0]
    for layer in range(adapter.n_layers):
        got = submodule_log_probs(adapter, pos, maps, layer, "mat_attn")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    r2 = submodule_r2(adapter, pos, maps)
    attn = r2[(r2.submodule == "attn") & (r2.mapping == "mat")]
    assert (attn.r2 > 1 - 1e-6).all()


def test_mat_ffn_equals_model_when_mlp_is_linear():
    """A GPT-2 whose MLP is linear by construction (identity activation, no biases)."""
    model = tiny_model("gpt2")
    model.config.activation_function = "linear"
    for block in model.transformer.h:
        from transformers.activations import ACT2FN

        block.mlp.act = ACT2FN["linear"]
        with torch.no_grad():
            block.mlp.c_fc.bias.zero_()
            block.mlp.c_proj.bias.zero_()
    adapter = HFAdapter(model, device="cpu")
    pos = _random_positions(adapter)
    maps = fit_submodule_maps(adapter, pos, batch_size=32, ridge=1e-9)
    table = evaluate_submodule_shortcuts(adapter, pos, maps, mappings=["mat_ffn"], batch_size=50)
    assert (table["precision@1"] == 1.0).all()
    assert table["surprisal"].tolist() == pytest.approx(_model_surprisal(adapter, pos), rel=1e-5)
    lp = submodule_log_probs(adapter, pos[:10], maps, 0, "mat_ffn")
    with torch.no_grad():
        want = torch.stack([adapter.log_probs(torch.tensor([p.input_ids]))[0, p.read_at] for p in pos[:10]])
    torch.testing.assert_close(lp, want, rtol=1e-4, atol=1e-4)


def _model_surprisal(adapter, pos):
    bits = []
    with torch.no_grad():
        for p in pos:
            lp = adapter.log_probs(torch.tensor([p.input_ids]))[0, p.read_at]
            bits.append(float(-lp.max() / np.log(2)))
    return [float(np.mean(bits))] * adapter.n_layers


def _gpt2_one_token_shortcut(model, maps, x0, first, mapping):
    """GPT-2 on one-token inputs ``x0`` [n, d] (embeddings), written out by hand; from block ``first`` on,
    ``mapping``'s submodules are replaced by their maps."""
    x = x0
    for layer in range(len(model.transformer.h)):
        blk = model.transformer.h[layer]
        replaced = mapping if layer >= first else None

        def A(name, layer=layer):
            return maps[layer, name].T

        h = x @ A("ln1") if replaced == "mat_ln1_ln2" else blk.ln_1(x)
        d = h.shape[-1]
        v = (h @ blk.attn.c_attn.weight + blk.attn.c_attn.bias)[:, 2 * d:]  # one key: softmax weight 1
        a = h @ A("attn") if replaced == "mat_attn" else v @ blk.attn.c_proj.weight + blk.attn.c_proj.bias
        m = x + a
        h2 = m @ A("ln2") if replaced == "mat_ln1_ln2" else blk.ln_2(m)
        f = h2 @ A("mlp") if replaced == "mat_ffn" else blk.mlp(h2)
        x = m + f
    return torch.log_softmax(model.lm_head(model.transformer.ln_f(x)), -1)


@pytest.mark.parametrize("mapping", ["mat_attn", "mat_ffn", "mat_ln1_ln2"])
def test_replacement_matches_hand_written_gpt2(mapping):
    model = tiny_model("gpt2")
    adapter = HFAdapter(model, device="cpu")
    pos = _one_token_positions(60)
    maps = fit_submodule_maps(adapter, _random_positions(adapter, 200), ridge=1e-6)
    ids = torch.tensor([[p.input_ids[0]] for p in pos])
    with torch.no_grad():
        emb = model.transformer.wte(ids[:, 0]) + model.transformer.wpe(torch.zeros_like(ids[:, 0]))
        for first in range(adapter.n_layers):
            want = _gpt2_one_token_shortcut(model, maps, emb, first, mapping)
            got = submodule_log_probs(adapter, pos, maps, first, mapping)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama", "bert"])
def test_maps_equal_numpy_lstsq(arch):
    adapter = HFAdapter(tiny_model(arch), device="cpu")
    pos = _random_positions(adapter, 100, seed=1)
    maps = fit_submodule_maps(adapter, pos, batch_size=17, ridge=1e-9)
    # the chain's points captured one position at a time, solved with numpy
    pts = {k: [] for k in ("resid_pre", "attn_in", "attn_out", "mlp_in", "mlp_out", "resid_post")}
    with torch.no_grad(), capture(adapter, list(pts), layers=[1]) as c:
        for p in pos:
            adapter.run(torch.tensor([p.input_ids]))
            for k in pts:
                pts[k].append(c[k, 1][0, p.read_at].double().numpy())
    P = {k: np.stack(v) for k, v in pts.items()}
    P["attn_res"], P["mlp_res"] = P["resid_pre"] + P["attn_out"], P["mlp_in"] + P["mlp_out"]
    for step in CHAINS[adapter.block_layout]:
        X, Y = P[step.source], P[step.target]
        # the same ridge (relative to the mean diagonal of X^T X), solved by numpy on the stacked rows:
        # least squares on X stacked over sqrt(r) I
        r = 1e-9 * np.mean(np.sum(X * X, 0))
        Xa = np.vstack([X, np.sqrt(r) * np.eye(X.shape[1])])
        Ya = np.vstack([Y, np.zeros((X.shape[1], Y.shape[1]))])
        sol = np.linalg.lstsq(Xa, Ya, rcond=None)[0]
        fit, ref = X @ maps[1, step.name].double().numpy().T, X @ sol
        assert np.abs(fit - ref).max() <= 1e-3 * np.abs(ref).max() + 1e-5, step.name


def test_r2_matches_sklearn(tmp_path):
    from sklearn.metrics import r2_score

    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    train, val = _random_positions(adapter, 120, 2), _random_positions(adapter, 40, 3)
    maps = fit_submodule_maps(adapter, train, layers=[0, 2])
    table = submodule_r2(adapter, val, maps, batch_size=7)
    assert sorted(set(table.layer)) == [0, 2] and len(table) == 2 * 6 * 2
    with torch.no_grad(), capture(adapter, ["attn_in", "attn_out"], layers=[2]) as c:
        xs, ys = [], []
        for p in val:
            adapter.run(torch.tensor([p.input_ids]))
            xs.append(c["attn_in", 2][0, p.read_at].numpy())
            ys.append(c["attn_out", 2][0, p.read_at].numpy())
    X, Y = np.stack(xs), np.stack(ys)
    row = table[(table.layer == 2) & (table.submodule == "attn")].set_index("mapping").r2
    assert row["mat"] == pytest.approx(r2_score(Y, X @ maps[2, "attn"].numpy().T), rel=1e-5, abs=1e-5)
    assert row["id"] == pytest.approx(r2_score(Y, X), rel=1e-6)
    save_submodule_maps(tmp_path / "s.safetensors", maps, {"model": "x"})
    back, meta = load_submodule_maps(tmp_path / "s.safetensors")
    assert meta["model"] == "x" and set(back) == set(maps)
    torch.testing.assert_close(back[2, "attn"], maps[2, "attn"])


def test_post_norm_has_no_ln_mapping_and_missing_maps_are_named():
    adapter = HFAdapter(tiny_model("bert"), device="cpu")
    pos = _one_token_positions(5)
    with pytest.raises(FflayersError, match="post-norm"):
        submodule_log_probs(adapter, pos, {}, 0, "mat_ln1_ln2")
    gpt2 = HFAdapter(tiny_model("gpt2"), device="cpu")
    with pytest.raises(FflayersError, match="no submodule map for layer 1 attn"):
        submodule_log_probs(gpt2, pos, {(0, "attn"): torch.eye(32)}, 1, "mat_attn")
    with pytest.raises(FflayersError, match="unknown submodule mapping"):
        submodule_log_probs(gpt2, pos, {}, 0, "mat_everything")


def test_fairseq_prenorm_mat_ffn_runs_and_reads_only_its_row(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_prenorm_lm")
    sents = [[adapter.vocab.bos_id or 2] + list(range(10, 10 + n)) for n in (4, 6, 9, 5, 7)] * 30
    pos = sample_positions(adapter, sents, seed=0)
    maps = fit_submodule_maps(adapter, pos, ridge=1e-4)
    table = evaluate_submodule_shortcuts(adapter, pos[:20], maps, batch_size=8)
    assert set(table.mapping) == {"mat_attn", "mat_ffn", "mat_ln1_ln2"}
    assert table["precision@10"].between(0, 1).all()
    # the last layer's mat_ffn shortcut differs from the model only through that one block's MLP
    last = adapter.n_layers - 1
    lp = submodule_log_probs(adapter, pos[:4], maps, last, "mat_ffn")
    assert torch.isfinite(lp).all() and torch.allclose(lp.exp().sum(-1), torch.ones(4), atol=1e-4)
