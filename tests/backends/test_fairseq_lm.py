"""FairseqLMAdapter against the real fairseq: eval-lm parity, hook recomputation, edge blocking, old checkpoints."""

from __future__ import annotations

import argparse
import datetime
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from fflayers import fairseq_tools
from fflayers.backends.base import HOOK_POINTS, AdapterError
from fflayers.backends.fairseq_lm import FairseqLMAdapter, load_fairseq_lm
from fflayers.hooks import block_attention, capture

MODELS = ["fairseq_plain_lm", "fairseq_adaptive_lm", "fairseq_prenorm_lm"]


def pad_batch(seqs: list[list[int]], pad: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists; padded slots get ``fill`` (default: ``pad``)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad if fill is None else fill, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids, mask


def sample_lines(trained, n: int = 6) -> list[str]:
    return trained.test.read_text(encoding="utf-8").splitlines()[:n]


def score_lines(adapter: FairseqLMAdapter, lines: list[str], batch_size: int = 16) -> list[list[float]]:
    """Per-token log-probs of each line scored as ``</s> w1..wn`` -> ``w1..wn </s>`` (batched, right-padded)."""
    out: list[list[float]] = []
    eos = adapter.dictionary.eos()
    for start in range(0, len(lines), batch_size):
        seqs = [adapter.tokenize(line) for line in lines[start : start + batch_size]]
        ids, mask = pad_batch(seqs, adapter.pad_id)
        with torch.no_grad():
            lp = adapter.log_probs(ids, mask)
        for row, seq in enumerate(seqs):
            targets = torch.tensor(seq[1:] + [eos])
            out.append(lp[row, torch.arange(len(seq)), targets].tolist())
    return out


# ----- eval-lm parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fairseq_plain_lm", "fairseq_adaptive_lm"])
def test_mean_log_prob_matches_fairseq_eval_lm(name, request, fairseq_adapters):
    trained = request.getfixturevalue(name)
    adapter = fairseq_adapters(name)
    result = fairseq_tools.eval_lm_scores(trained.data_bin, trained.model_dir, sample_break_mode="eos")
    reference = result.mean_loss()  # what fairseq_tools.eval_lm returns, from the same run
    lines = trained.test.read_text(encoding="utf-8").splitlines()
    scores = score_lines(adapter, lines)
    n_tokens = sum(len(s) for s in scores)
    mine = -sum(sum(s) for s in scores) / n_tokens
    assert n_tokens == sum(len(v) for v in result.samples.values())
    assert abs(mine - reference) < 1e-4, (mine, reference)
    assert abs(mine - result.loss) < 1e-4  # the 4-decimal base-2 summary line agrees too
    # token by token: sample id i is line i with --sample-break-mode eos
    for i, tokens in result.samples.items():
        assert [w for w, _ in tokens] == lines[i].split() + ["</s>"]
        assert scores[i] == pytest.approx([s for _, s in tokens], abs=2e-5)


# ----- old checkpoints -----------------------------------------------------------------------------------------


def make_old_style_checkpoint(src_dir, dst_dir) -> dict:
    """Rewrite a new checkpoint the way old fairseq stored it: ``args`` Namespace (no ``cfg``), fused
    self-attention ``in_proj_weight`` / ``in_proj_bias``, legacy (non-zip) torch serialization."""
    state = torch.load(src_dir / "model.pt", weights_only=True)
    cfg = state.pop("cfg")
    flat = {}
    for group in cfg.values():
        if isinstance(group, dict):
            for k, v in group.items():
                if k != "_name":
                    flat.setdefault(k, v)
    args = argparse.Namespace(**flat)
    for group in ("task", "criterion", "optimizer", "lr_scheduler"):
        setattr(args, group, cfg[group]["_name"])
    args.arch = cfg["model"]["_name"]
    state["args"] = args
    model = {}
    for key, value in state["model"].items():
        if ".self_attn.q_proj." in key:
            prefix, kind = key.split(".self_attn.q_proj.")
            parts = [state["model"][f"{prefix}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            model[f"{prefix}.self_attn.in_proj_{kind}"] = torch.cat(parts, dim=0).clone()
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        else:
            model[key] = value
    state["model"] = model
    dst_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, dst_dir / "model.pt", _use_new_zipfile_serialization=False)
    shutil.copy(src_dir / "dict.txt", dst_dir / "dict.txt")
    return state


@pytest.mark.parametrize("name", ["fairseq_adaptive_lm", "fairseq_plain_lm"])
def test_old_namespace_checkpoint_gives_identical_log_probs(name, request, fairseq_adapters, tmp_path):
    trained = request.getfixturevalue(name)
    state = make_old_style_checkpoint(trained.model_dir, tmp_path / "old")
    assert "cfg" not in state and isinstance(state["args"], argparse.Namespace)
    assert any(k.endswith("self_attn.in_proj_weight") for k in state["model"])
    assert not any(".q_proj." in k for k in state["model"])
    old = load_fairseq_lm(tmp_path / "old", device="cpu")  # weights-only: Namespace is allow-listed
    new = fairseq_adapters(name)
    seqs = [new.tokenize(line) for line in sample_lines(trained)]
    ids, mask = pad_batch(seqs, new.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(old.log_probs(ids, mask), new.log_probs(ids, mask), rtol=0, atol=0)
    assert old.normalize_before == new.normalize_before


# ----- hooks ---------------------------------------------------------------------------------------------------


def _ln(x, module):
    return F.layer_norm(x, module.weight.shape, module.weight, module.bias, module.eps)


@pytest.mark.parametrize("name", MODELS)
def test_hook_values_equal_recomputation_from_weights(name, request, fairseq_adapters):
    trained = request.getfixturevalue(name)
    adapter = fairseq_adapters(name)
    seqs = [adapter.tokenize(line) for line in sample_lines(trained)]
    ids, mask = pad_batch(seqs, adapter.pad_id)
    with torch.no_grad(), capture(adapter, HOOK_POINTS) as cache:
        final = adapter.run(ids, mask)
    B, T = ids.shape
    m = mask[..., None]
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for layer_idx, layer in enumerate(adapter.layers):
        c = {p: cache[p, layer_idx] for p in HOOK_POINTS}
        for p in ("resid_pre", "attn_out", "mlp_out", "resid_post"):
            assert c[p].shape == (B, T, adapter.d_model), p
        for p in ("mlp_key", "mlp_coef"):
            assert c[p].shape == (B, T, adapter.d_ff), p
        resid_mid = c["resid_pre"] + c["attn_out"]
        if trained.normalize_before:
            mlp_in = _ln(resid_mid, layer.final_layer_norm)
        else:
            resid_mid = _ln(resid_mid, layer.self_attn_layer_norm)
            mlp_in = resid_mid
        key = F.linear(mlp_in, layer.fc1.weight, layer.fc1.bias)
        coef = torch.relu(key)
        out = F.linear(coef, layer.fc2.weight, layer.fc2.bias)
        post = resid_mid + out if trained.normalize_before else _ln(resid_mid + out, layer.final_layer_norm)
        torch.testing.assert_close(c["mlp_key"] * m, key * m, **tol)
        torch.testing.assert_close(c["mlp_coef"] * m, coef * m, **tol)
        torch.testing.assert_close(c["mlp_out"] * m, out * m, **tol)
        torch.testing.assert_close(c["resid_post"] * m, post * m, **tol)
        # key-value view: keys read the FFN input, values are what each neuron writes
        torch.testing.assert_close(mlp_in @ adapter.ffn_keys(layer_idx).T + layer.fc1.bias, key, **tol)
        torch.testing.assert_close(coef @ adapter.ffn_values(layer_idx) + layer.fc2.bias, out, **tol)
        if layer_idx + 1 < adapter.n_layers:
            torch.testing.assert_close(cache["resid_pre", layer_idx + 1], c["resid_post"])
    torch.testing.assert_close(final, cache["resid_post", adapter.n_layers - 1])
    # the stream entering block 0: token embedding (input_embeddings) + positional embedding
    positions = adapter.decoder.embed_positions(ids.masked_fill(~mask, adapter.pad_id))
    expected = adapter.input_embeddings()[ids] + positions
    torch.testing.assert_close(cache["resid_pre", 0] * m, expected * m, **tol)


@pytest.mark.parametrize("name", MODELS)
def test_input_embeddings_match_the_embedding_module(name, fairseq_adapters):
    adapter = fairseq_adapters(name)
    dec = adapter.decoder
    emb = adapter.input_embeddings()
    assert emb.shape == (adapter.vocab_size, adapter.d_model)
    with torch.no_grad():
        expected = dec.embed_scale * dec.embed_tokens(torch.arange(adapter.vocab_size)[None])[0]
    torch.testing.assert_close(emb, expected)
    assert adapter.ffn_keys(0).shape == adapter.ffn_values(-1).shape == (adapter.d_ff, adapter.d_model)


# ----- output head ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("name", MODELS)
def test_project_equals_get_normalized_probs(name, request, fairseq_adapters):
    trained = request.getfixturevalue(name)
    adapter = fairseq_adapters(name)
    seqs = [adapter.tokenize(line) for line in sample_lines(trained, 3)]
    ids, mask = pad_batch(seqs, adapter.pad_id)
    with torch.no_grad():
        net_output = adapter.model(ids)
        expected = adapter.model.get_normalized_probs(net_output, log_probs=True)
        got = adapter.project(adapter.run(ids, mask))
    assert got.shape == (*ids.shape, adapter.vocab_size)
    torch.testing.assert_close(got * mask[..., None], expected * mask[..., None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(ids.shape), rtol=0, atol=1e-4)


def test_project_lets_gradients_through_the_adaptive_softmax(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_adaptive_lm")
    h = torch.randn(3, adapter.d_model, requires_grad=True)
    adapter.project(h)[:, -1].sum().backward()  # a tail-band token
    assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


# ----- padding -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fairseq_plain_lm", "fairseq_adaptive_lm"])
def test_right_padding_does_not_change_real_positions(name, request, fairseq_adapters):
    trained = request.getfixturevalue(name)
    adapter = fairseq_adapters(name)
    lines = sample_lines(trained, 8)
    seqs = sorted((adapter.tokenize(line) for line in lines), key=len)
    short = seqs[0]
    assert len(short) < len(seqs[-1])
    with torch.no_grad():
        alone = adapter.run(torch.tensor([short]))[0]
        # padded slots hold a real word id: the mask, not the id, must mark them as padding
        ids, mask = pad_batch(seqs, adapter.pad_id, fill=adapter.tokenize("the", add_bos=False)[0])
        batched = adapter.run(ids, mask)[0, : len(short)]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


# ----- attention edges -----------------------------------------------------------------------------------------


def manual_attention(layer, x_in, blocked, lengths, pre_ln: bool):
    """Self-attention output recomputed from the weights, mask built here: causal, padding, blocked edges."""
    attn = layer.self_attn
    x = _ln(x_in, layer.self_attn_layer_norm) if pre_ln else x_in
    B, T, C = x.shape
    H = attn.num_heads
    Dh = C // H
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(B, T, H, Dh).transpose(1, 2) / math.sqrt(Dh)
    k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(B, T, H, Dh).transpose(1, 2)
    v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(B, T, H, Dh).transpose(1, 2)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k)
    keep = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for s in range(t + 1):
                keep[b, t, s] = s < lengths[b] and not bool(blocked[t, s])
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    ctx = torch.einsum("bhts,bhsd->bhtd", probs, v).transpose(1, 2).reshape(B, T, C)
    return F.linear(ctx, attn.out_proj.weight, attn.out_proj.bias)


@pytest.mark.parametrize("name", ["fairseq_plain_lm", "fairseq_adaptive_lm"])
def test_blocked_edges_equal_explicit_recomputation(name, request, fairseq_adapters):
    trained = request.getfixturevalue(name)
    adapter = fairseq_adapters(name)
    seqs = [adapter.tokenize(line) for line in sample_lines(trained, 4)]
    ids, mask = pad_batch(seqs, adapter.pad_id)
    lengths = [len(s) for s in seqs]
    T = ids.shape[1]
    blocked = torch.zeros(T, T, dtype=torch.bool)
    blocked[T - 1, 1:4] = True  # last position may not read positions 1..3
    blocked[5, :] = True  # position 5 reads nothing
    blocked[7, 2] = True
    layer_idx = adapter.n_layers - 1
    layer = adapter.layers[layer_idx]
    with torch.no_grad():
        plain = adapter.log_probs(ids, mask)
        # capture installed before the blocking: it must still see the blocked output
        with capture(adapter, ["resid_pre", "attn_out"], layers=[layer_idx]) as cache, block_attention(adapter, {layer_idx: blocked}):
            blocked_lp = adapter.log_probs(ids, mask)
        expected = manual_attention(layer, cache["resid_pre", layer_idx], blocked, lengths, trained.normalize_before)
        m = mask[..., None]
        torch.testing.assert_close(cache["attn_out", layer_idx] * m, expected * m, rtol=1e-5, atol=1e-5)
        # a row with every edge blocked gives a zero attention output: only out_proj's bias remains
        torch.testing.assert_close(cache["attn_out", layer_idx][:, 5], layer.self_attn.out_proj.bias.expand(len(seqs), -1))
        assert not torch.allclose(blocked_lp, plain)
        # blocking no edge reproduces the unmodified model
        with block_attention(adapter, {i: torch.zeros(T, T, dtype=torch.bool) for i in range(adapter.n_layers)}):
            none_blocked = adapter.log_probs(ids, mask)
        torch.testing.assert_close(none_blocked * m, plain * m, rtol=1e-5, atol=1e-5)
        # and after the context exits the model is unmodified again
        torch.testing.assert_close(adapter.log_probs(ids, mask), plain)


def test_per_example_edge_masks(fairseq_adapters, fairseq_adaptive_lm):
    adapter = fairseq_adapters("fairseq_adaptive_lm")
    seqs = [adapter.tokenize(line) for line in sample_lines(fairseq_adaptive_lm, 2)]
    ids, mask = pad_batch(seqs, adapter.pad_id)
    T = ids.shape[1]
    per_example = torch.zeros(2, T, T, dtype=torch.bool)
    per_example[1, 3, :] = True  # only the second sentence's position 3 reads nothing
    with torch.no_grad(), capture(adapter, ["attn_out"], layers=[0]) as cache:
        adapter.run(ids, mask)
        plain = cache["attn_out", 0].clone()
        with block_attention(adapter, {0: per_example}):
            adapter.run(ids, mask)
    bias = adapter.layers[0].self_attn.out_proj.bias
    torch.testing.assert_close(cache["attn_out", 0][0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache["attn_out", 0][1, 3], bias)


# ----- tokenization --------------------------------------------------------------------------------------------


def test_tokenization_follows_the_dictionary(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_adaptive_lm")
    d = adapter.dictionary
    ids = adapter.tokenize(" The old city was built in 1900 . ")
    assert ids[0] == d.eos() == adapter.bos_id
    assert adapter.id_to_token(ids[1:]) == "The old city was built in 1900 .".split()
    assert adapter.tokenize("zyzzyva city")[1] == d.unk()
    assert adapter.token_to_id("zyzzyva") is None
    assert adapter.token_to_id("city") == d.index("city")
    assert adapter.tokenize("city", add_bos=False) == [d.index("city")]
    assert adapter.detokenize(ids + [adapter.pad_id]) == "The old city was built in 1900 ."
    assert adapter.pad_id == d.pad()


def test_raw_text_uses_moses_with_wikitext_splits(fairseq_adaptive_lm):
    adapter = load_fairseq_lm(fairseq_adaptive_lm.model_dir, raw_text=True)
    words = adapter.words('The dark-red city, with 7,100 ships, was "famous".')
    assert words == ["The", "dark", "@-@", "red", "city", ",", "with", "7", "@,@", "100", "ships", ",", "was", '"', "famous", '"', "."]
    assert adapter.detokenize(adapter.tokenize("a dark-red city")) == "a dark-red city"


# ----- bad inputs ----------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_model_dir(tmp_path):
    with pytest.raises(AdapterError) as err:
        load_fairseq_lm(tmp_path / "nowhere")
    assert "does not exist" in _one_line(err)


def test_dir_without_dict(fairseq_plain_lm, tmp_path):
    shutil.copy(fairseq_plain_lm.model_dir / "model.pt", tmp_path / "model.pt")
    with pytest.raises(AdapterError) as err:
        load_fairseq_lm(tmp_path)
    assert "dict.txt" in _one_line(err)


def test_dir_without_checkpoint(fairseq_plain_lm, tmp_path):
    shutil.copy(fairseq_plain_lm.model_dir / "dict.txt", tmp_path / "dict.txt")
    with pytest.raises(AdapterError) as err:
        load_fairseq_lm(tmp_path)
    assert "model.pt" in _one_line(err)


def test_checkpoint_choice(fairseq_plain_lm, tmp_path):
    shutil.copy(fairseq_plain_lm.model_dir / "dict.txt", tmp_path / "dict.txt")
    shutil.copy(fairseq_plain_lm.model_dir / "model.pt", tmp_path / "checkpoint_last.pt")
    adapter = load_fairseq_lm(tmp_path)  # the only checkpoint
    assert adapter.n_layers == 2
    (tmp_path / "checkpoint_best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AdapterError) as err:  # checkpoint_best.pt wins over checkpoint_last.pt
        load_fairseq_lm(tmp_path)
    assert "checkpoint_best.pt" in _one_line(err)
    assert load_fairseq_lm(tmp_path, checkpoint="checkpoint_last.pt").n_layers == 2


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "empty"])
def test_corrupt_checkpoint(corruption, fairseq_plain_lm, tmp_path):
    shutil.copy(fairseq_plain_lm.model_dir / "dict.txt", tmp_path / "dict.txt")
    data = (fairseq_plain_lm.model_dir / "model.pt").read_bytes()
    payload = {"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 10, "empty": b""}[corruption]
    (tmp_path / "model.pt").write_bytes(payload)
    with pytest.raises(AdapterError) as err:
        load_fairseq_lm(tmp_path)
    msg = _one_line(err)
    assert "model.pt" in msg and ("corrupt" in msg or "truncated" in msg)


def test_weights_only_refuses_unknown_global_unless_trusted(fairseq_plain_lm, tmp_path):
    state = torch.load(fairseq_plain_lm.model_dir / "model.pt", weights_only=True)
    state["extra_state"]["saved_at"] = datetime.date(2020, 1, 2)
    torch.save(state, tmp_path / "model.pt")
    shutil.copy(fairseq_plain_lm.model_dir / "dict.txt", tmp_path / "dict.txt")
    with pytest.raises(AdapterError) as err:
        load_fairseq_lm(tmp_path)
    msg = _one_line(err)
    assert "datetime.date" in msg and "trust_checkpoint=True" in msg
    adapter = load_fairseq_lm(tmp_path, trust_checkpoint=True)
    assert adapter.n_layers == 2


def test_not_a_transformer_lm(fairseq_plain_lm, tmp_path):
    state = torch.load(fairseq_plain_lm.model_dir / "model.pt", weights_only=True)
    state["cfg"]["model"]["_name"] = "lstm_lm"
    torch.save(state, tmp_path / "model.pt")
    shutil.copy(fairseq_plain_lm.model_dir / "dict.txt", tmp_path / "dict.txt")
    with pytest.raises(AdapterError) as err:
        load_fairseq_lm(tmp_path)
    assert "not a fairseq transformer LM" in _one_line(err)
    torch.save({"model": state["model"]}, tmp_path / "model.pt")
    with pytest.raises(AdapterError) as err:
        load_fairseq_lm(tmp_path)
    assert "neither 'args' nor 'cfg'" in _one_line(err)


def test_dictionary_that_does_not_fit(fairseq_plain_lm, tmp_path):
    shutil.copy(fairseq_plain_lm.model_dir / "model.pt", tmp_path / "model.pt")
    lines = (fairseq_plain_lm.model_dir / "dict.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "dict.txt").write_text("\n".join(lines[:-5]) + "\n", encoding="utf-8")
    with pytest.raises(AdapterError) as err:
        load_fairseq_lm(tmp_path)
    assert "dict.txt" in _one_line(err)


def test_sentence_longer_than_max_positions(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_plain_lm")
    assert adapter.max_positions == 64  # tokens_per_sample of the training run
    ids = torch.tensor([adapter.tokenize(" ".join(["city"] * 80))])
    with pytest.raises(AdapterError) as err:
        adapter.run(ids)
    assert "64" in _one_line(err)
    assert adapter.run(ids[:, :64]) is not None
