"""HF adapter: interventions through the hooks, edge blocking vs the model's own eager attention and its
routes, architecture and early-stop errors (the interface contract itself: test_contract.py)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.backends.hf_arch import ARCHITECTURES
from fflayers.core import ModelError
from fflayers.hooks import block_attention, capture, intervene, replace, scale
from tests.fixtures.hf_models import HF_ARCHS, VOCAB, tiny_model

ALL_POINTS = ["resid_pre", "attn_out", "mlp_in", "mlp_key", "mlp_coef", "mlp_out", "resid_post"]


def batch(seed: int = 1, B: int = 2, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        mask[1, T - 3 :] = False
    return ids, mask


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_writing_back_captured_values_changes_nothing(arch):
    adapter = HFAdapter(tiny_model(arch), device="cpu")
    ids, mask = batch()
    with capture(adapter, ALL_POINTS) as c:
        plain = adapter.log_probs(ids, mask)
    edits = [replace(p, layer, c[p, layer]) for p in ALL_POINTS for layer in range(adapter.n_layers)]
    with intervene(adapter, edits):
        edited = adapter.log_probs(ids, mask)
    assert torch.equal(plain, edited)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_zeroing_a_coefficient_equals_removing_its_value(arch):
    model = tiny_model(arch)
    adapter = HFAdapter(model, device="cpu")
    ids, mask = batch()
    layer, neuron = 1, 5
    with intervene(adapter, [scale("mlp_coef", layer, 0.0, index=[neuron])]):
        edited = adapter.log_probs(ids, mask)
    pruned = copy.deepcopy(model)
    fc_out = pruned.get_submodule(ARCHITECTURES[arch].layers)[layer].get_submodule(ARCHITECTURES[arch].fc_out)
    with torch.no_grad():
        if ARCHITECTURES[arch].conv1d:
            fc_out.weight[neuron, :] = 0
        else:
            fc_out.weight[:, neuron] = 0
    reference = HFAdapter(pruned, device="cpu").log_probs(ids, mask)
    torch.testing.assert_close(edited, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited, adapter.log_probs(ids, mask))


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_edit_at_chosen_positions_only(arch):
    adapter = HFAdapter(tiny_model(arch), device="cpu")
    ids, mask = batch()
    ids, mask = ids[:1], mask[:1]
    with capture(adapter, ["mlp_coef"], layers=[0]) as plain:
        adapter.run(ids, mask)
    with intervene(adapter, [scale("mlp_coef", 0, 3.0, positions=[2, 4], index=[1, 7])]), \
            capture(adapter, ["mlp_coef"], layers=[0]) as edited:
        adapter.run(ids, mask)
    expected = plain["mlp_coef", 0].clone()
    for p in (2, 4):
        for i in (1, 7):
            expected[0, p, i] *= 3.0
    torch.testing.assert_close(edited["mlp_coef", 0], expected)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_gradient_of_scaled_coefficient_matches_finite_differences(arch):
    model = tiny_model(arch).double()
    adapter = HFAdapter(model, device="cpu")
    ids, mask = batch()
    ids, mask = ids[:1], mask[:1]
    target = 11

    def objective(alpha: torch.Tensor) -> torch.Tensor:
        with intervene(adapter, [scale("mlp_coef", 1, alpha, index=list(range(0, 64, 2)))]):
            return adapter.log_probs(ids, mask)[0, -1, target]

    alpha = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(objective(alpha), alpha)
    eps = 1e-3  # some architectures compute attention / norms in fp32 even in a float64 model
    with torch.no_grad():
        fd = (objective(torch.tensor(1.3 + eps, dtype=torch.float64))
              - objective(torch.tensor(1.3 - eps, dtype=torch.float64))) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=2e-3, atol=1e-5)
    assert grad.abs() > 0


def additive_mask(allowed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[B, 1, T, S] additive mask: 0 where allowed, dtype min elsewhere."""
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


@pytest.mark.parametrize("arch", [a for a in HF_ARCHS if a != "gpt_neo"])
def test_blocked_edges_equal_model_run_with_explicit_mask(arch):
    """Blocking edges in every layer equals the model's own eager attention under an explicit 4D mask."""
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    T = ids.shape[1]
    blocked = torch.zeros(2, T, T, dtype=torch.bool)
    blocked[0, 6, 1:4] = True  # query 6 may not read keys 1..3
    blocked[1, 7, 0] = True
    blocked[1, 5, 2] = True
    every = torch.ones(T, T, dtype=torch.bool)
    causal = every if arch == "bert" else every.tril()
    allowed = causal[None] & ~blocked
    reference_model = copy.deepcopy(model)
    reference_model.config._attn_implementation = "eager"
    for m in reference_model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"
    logits = reference_model(input_ids=ids, attention_mask=additive_mask(allowed)).logits
    expected = torch.log_softmax(logits, -1)
    adapter = HFAdapter(model, device="cpu")
    with block_attention(adapter, {layer: blocked for layer in range(adapter.n_layers)}):
        got = adapter.log_probs(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, adapter.log_probs(ids), atol=1e-4)


def test_gpt_neo_local_attention_respected_when_blocking():
    adapter = HFAdapter(tiny_model("gpt_neo"), device="cpu")
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    plain = adapter.log_probs(ids)
    with block_attention(adapter, {1: torch.zeros(20, 20, dtype=torch.bool)}):
        same = adapter.log_probs(ids)
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)


def test_unknown_architecture_is_rejected():
    import transformers as tf

    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=50, hidden_size=16, num_attention_heads=2,
                                           num_hidden_layers=1, ffn_dim=32, max_position_embeddings=32,
                                           word_embed_proj_dim=16))
    with pytest.raises(ModelError, match="unsupported architecture 'opt'"):
        HFAdapter(model)


def test_stop_early_skips_later_layers():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    ids, mask = batch()
    with capture(adapter, ["mlp_coef"], layers=[0]) as c, capture(adapter, ["resid_pre"], layers=[2]) as late:
        with capture(adapter, ["mlp_coef"], layers=[0], stop_early=True):
            assert adapter.run(ids, mask) is None
    assert ("mlp_coef", 0) in c and ("resid_pre", 2) not in late


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_edge_blocking_route_is_the_interface_wherever_the_model_calls_it(arch):
    """The route is measured, not declared: every family whose attention source calls transformers'
    attention-function interface must get the interface route (GPT-J does since transformers 5.24)."""
    import inspect

    adapter = HFAdapter(tiny_model(arch), device="cpu")
    adapter.prepare_edge_blocking()
    source = inspect.getsource(type(adapter.attention_module(0)))
    calls_interface = "ALL_ATTENTION_FUNCTIONS" in source or "attention_interface" in source
    expected = "interface" if calls_interface else "method"
    assert adapter.edge_blocking_route == expected


def test_edge_blocking_without_interface_or_method_is_a_one_line_error():
    """GPT-Neo's attention has no interface; an adapter that may not wrap its ``_attn`` has no route."""
    import transformers

    adapter = HFAdapter(tiny_model("gpt_neo"), device="cpu")
    adapter.spec = dataclasses.replace(adapter.spec, attn_method=None)
    adapter.family = "mystery"
    T = 5
    with pytest.raises(ModelError) as err:
        with block_attention(adapter, {0: torch.zeros(T, T, dtype=torch.bool)}):
            adapter.run(torch.zeros(1, T, dtype=torch.long))
    msg = str(err.value)
    assert "\n" not in msg and "mystery" in msg and transformers.__version__ in msg


@pytest.mark.parametrize("multi_query", [True, False])
def test_gpt_bigcode_attention_weights_equal_the_models_own_qkv(multi_query):
    """GPT-BigCode's fused ``c_attn`` in both layouts (multi-query: one key/value head; else per head): the
    per-head weights give the query, key and value the attention module computes (captured at transformers'
    attention-function call, the module's own split)."""
    import transformers as tf
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    torch.manual_seed(0)
    cfg = tf.GPTBigCodeConfig(n_embd=16, n_inner=32, n_head=4, n_layer=2, n_positions=32, vocab_size=50,
                              multi_query=multi_query, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter = HFAdapter(model, device="cpu")
    seen = {}

    def keep(module, query, key, value, *args, **kwargs):
        seen.setdefault("qkv", (query, key, value))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register("fflayers_test_keep", keep)
    model.set_attn_implementation("fflayers_test_keep")
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad(), capture(adapter, ["attn_in"], [0]) as c:
        model(ids)
    w = adapter.attention_weights(0)
    assert (w.n_heads, w.n_kv_heads) == (4, 1 if multi_query else 4)
    x = c["attn_in", 0][0]
    for name, got in zip("QKV", seen["qkv"], strict=True):  # [1, heads, T, d_head]
        W, b = getattr(w, f"W_{name}"), getattr(w, f"b_{name}")
        mine = torch.einsum("td,hde->hte", x, W) + b[:, None]
        torch.testing.assert_close(mine, got[0], atol=1e-5, rtol=1e-5)


def test_phi3_key_edits_reach_the_gate_half_only():
    """Phi-3's keys are the gate half of the fused ``gate_up_proj`` output: capturing them, replacing some and
    scaling others equals plain torch hooks that read and edit features ``:d_ff`` of that output (the up half
    untouched)."""
    from tests.backends.conftest import hf_model

    model = hf_model("phi3")
    adapter = HFAdapter(model, device="cpu")
    d_ff, layer = adapter.d_ff, 1
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    fused = adapter.blocks[layer].mlp.gate_up_proj
    assert fused.out_features == 2 * d_ff

    def by_hand(module, args, output):
        out = output.clone()
        out[..., 3] = 0.5
        out[:, 2:4, 7] *= -2.0
        return out

    with torch.no_grad():
        seen = {}
        handle = fused.register_forward_hook(lambda m, a, out: seen.update(gate=out[..., :d_ff]))
        plain = adapter.log_probs(ids)
        handle.remove()
        handle = fused.register_forward_hook(by_hand)
        want = adapter.log_probs(ids)
        handle.remove()
        with capture(adapter, ["mlp_key"], [layer]) as c:
            adapter.log_probs(ids)
        with intervene(adapter, [replace("mlp_key", layer, 0.5, index=[3]),
                                 scale("mlp_key", layer, -2.0, positions=[2, 3], index=[7])]):
            got = adapter.log_probs(ids)
    torch.testing.assert_close(c["mlp_key", layer], seen["gate"])
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)


def test_distilbert_with_and_without_its_mlm_head(tmp_path, tiny_gpt2_dir):
    """DistilBERT's MLM head is computed inline by its model class: ``project`` of the last block's output
    equals the masked-LM logits; a checkpoint saved without the head loads as the encoder variant, whose
    ``project`` is a one-line error."""
    import transformers as tf

    from fflayers.backends.hf import load_hf_lm
    from tests.backends.conftest import hf_model

    model = hf_model("distilbert")
    adapter = HFAdapter(model, device="cpu")
    ids = torch.randint(5, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=ids).logits, -1)
        torch.testing.assert_close(adapter.project(adapter.run(ids)), want)
    tf.DistilBertModel(model.config).save_pretrained(tmp_path / "encoder")
    encoder = load_hf_lm(str(tmp_path / "encoder"), device="cpu", tokenizer_path=str(tiny_gpt2_dir))
    assert encoder.spec.body is None and encoder.n_layers == adapter.n_layers
    with pytest.raises(ModelError, match="no output head"):
        encoder.project(torch.zeros(1, encoder.d_model))
