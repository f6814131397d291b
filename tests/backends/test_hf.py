"""HF adapter: hook values vs recomputation from weights, head, interventions, edge blocking."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fflayers.backends.base import AdapterError
from fflayers.backends.hf import ARCHITECTURES, HFAdapter
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


def act_fn(adapter: HFAdapter):
    from transformers.activations import ACT2FN

    cfg = adapter.model.config
    name = getattr(cfg, "activation_function", None) or getattr(cfg, "hidden_act", None)
    return ACT2FN[name]


def mlp_input(adapter: HFAdapter, layer: int, c) -> torch.Tensor:
    """The normalised stream the MLP reads, recomputed from the captured stream and the block's norms."""
    block = adapter.blocks[layer]
    fam = adapter.family
    resid_pre, attn = c["resid_pre", layer], c["attn_out", layer]
    if fam in ("gpt2", "gpt_neo"):
        return block.ln_2(resid_pre + attn)
    if fam == "gptj":
        return block.ln_1(resid_pre)
    if fam == "gpt_neox":
        return block.post_attention_layernorm(resid_pre)
    if fam == "llama":
        return block.post_attention_layernorm(resid_pre + attn)
    if fam == "bert":
        return block.attention.output.LayerNorm(attn + resid_pre)
    raise AssertionError(fam)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hook_values_equal_recomputation_from_weights(arch):
    adapter = HFAdapter(tiny_model(arch), device="cpu")
    ids, mask = batch()
    with capture(adapter, ALL_POINTS) as c:
        adapter.run(ids, mask)
    act = act_fn(adapter)
    for layer in range(adapter.n_layers):
        block = adapter.blocks[layer]
        x = mlp_input(adapter, layer, c)
        torch.testing.assert_close(c["mlp_in", layer], x, rtol=1e-5, atol=1e-5)
        K, V = adapter.ffn_keys(layer), adapter.ffn_values(layer)
        fc_in = block.get_submodule(ARCHITECTURES[arch].fc_in)
        fc_out = block.get_submodule(ARCHITECTURES[arch].fc_out)
        b_in = fc_in.bias if fc_in.bias is not None else 0.0
        key = x @ K.T + b_in
        torch.testing.assert_close(c["mlp_key", layer], key, rtol=1e-5, atol=1e-5)
        coef = act(key)
        if arch == "llama":
            coef = coef * (x @ block.mlp.up_proj.weight.T)
        torch.testing.assert_close(c["mlp_coef", layer], coef, rtol=1e-5, atol=1e-5)
        b_out = fc_out.bias if fc_out.bias is not None else 0.0
        torch.testing.assert_close(c["mlp_out", layer], coef @ V + b_out, rtol=1e-5, atol=1e-5)
        pre, attn, mlp = c["resid_pre", layer], c["attn_out", layer], c["mlp_out", layer]
        if arch in ("gptj", "gpt_neox"):
            expected = pre + attn + mlp
        elif arch == "bert":
            expected = block.output.LayerNorm(mlp + block.attention.output.LayerNorm(attn + pre))
        else:
            expected = pre + attn + mlp
        torch.testing.assert_close(c["resid_post", layer], expected, rtol=1e-5, atol=1e-5)
        if layer + 1 < adapter.n_layers:
            torch.testing.assert_close(c["resid_pre", layer + 1], c["resid_post", layer])


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_project_of_last_hidden_equals_model_log_softmax(arch):
    model = tiny_model(arch)
    adapter = HFAdapter(model, device="cpu")
    ids, mask = batch()
    h = adapter.run(ids, mask)
    expected = torch.log_softmax(model(input_ids=ids, attention_mask=mask.long()).logits.float(), -1)
    torch.testing.assert_close(adapter.project(h, chunk_size=5)[mask], expected[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.log_probs(ids, mask)[mask], expected[mask], rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_blocking_no_edge_equals_plain_model(arch):
    adapter = HFAdapter(tiny_model(arch), device="cpu")
    ids, mask = batch()
    plain = adapter.log_probs(ids, mask)
    T = ids.shape[1]
    with block_attention(adapter, {layer: torch.zeros(T, T, dtype=torch.bool) for layer in range(adapter.n_layers)}):
        blocked = adapter.log_probs(ids, mask)
    torch.testing.assert_close(blocked[mask], plain[mask], rtol=1e-5, atol=1e-5)


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
    causal = torch.ones(T, T, dtype=torch.bool) if arch == "bert" else torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal[None] & ~blocked
    reference_model = copy.deepcopy(model)
    reference_model.config._attn_implementation = "eager"
    for m in reference_model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "eager"
    expected = torch.log_softmax(reference_model(input_ids=ids, attention_mask=additive_mask(allowed)).logits, -1)
    adapter = HFAdapter(model, device="cpu")
    with block_attention(adapter, {layer: blocked for layer in range(adapter.n_layers)}):
        got = adapter.log_probs(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, adapter.log_probs(ids), atol=1e-4)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_fully_blocked_row_gives_zero_attention(arch):
    model = tiny_model(arch)
    adapter = HFAdapter(model, device="cpu")
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    blocked = torch.zeros(7, 7, dtype=torch.bool)
    blocked[5, :] = True
    layer = 1
    with block_attention(adapter, {layer: blocked}), capture(adapter, ["attn_out", "resid_pre"]) as c:
        adapter.run(ids)
    with capture(adapter, ["attn_out", "resid_pre"]) as plain:
        adapter.run(ids)
    out_proj = [m for m in adapter.hook_site("attn_out", layer).module.modules() if isinstance(m, torch.nn.Linear)
                or type(m).__name__ == "Conv1D"][-1]
    bias = out_proj.bias if out_proj.bias is not None else torch.zeros(adapter.d_model)
    torch.testing.assert_close(c["attn_out", layer][0, 5], bias.detach(), rtol=1e-6, atol=1e-6)
    # other rows of that layer and all earlier layers untouched
    torch.testing.assert_close(c["attn_out", layer][0, :5], plain["attn_out", layer][0, :5])
    torch.testing.assert_close(c["resid_pre", layer], plain["resid_pre", layer])


def test_gpt_neo_local_attention_respected_when_blocking():
    adapter = HFAdapter(tiny_model("gpt_neo"), device="cpu")
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    plain = adapter.log_probs(ids)
    with block_attention(adapter, {1: torch.zeros(20, 20, dtype=torch.bool)}):
        same = adapter.log_probs(ids)
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)


def test_unknown_architecture_is_rejected():
    import transformers as tf

    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                                           ffn_dim=32, max_position_embeddings=32, word_embed_proj_dim=16))
    with pytest.raises(AdapterError, match="unsupported architecture 'opt'"):
        HFAdapter(model)


def test_sequence_longer_than_model_is_rejected():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    ids = torch.zeros(1, adapter.max_positions + 1, dtype=torch.long)
    with pytest.raises(AdapterError, match="longer than the model's 64 positions"):
        adapter.run(ids)


def test_layer_out_of_range_is_rejected():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    with pytest.raises(AdapterError, match="layer 7 is out of range"):
        with capture(adapter, ["mlp_key"], layers=[7]):
            pass
    with pytest.raises(AdapterError, match="unknown hook point"):
        with capture(adapter, ["mlp_keys"]):
            pass


def test_stop_early_skips_later_layers():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    ids, mask = batch()
    with capture(adapter, ["mlp_coef"], layers=[0]) as c, capture(adapter, ["resid_pre"], layers=[2]) as late:
        with capture(adapter, ["mlp_coef"], layers=[0], stop_early=True):
            assert adapter.run(ids, mask) is None
    assert ("mlp_coef", 0) in c and ("resid_pre", 2) not in late


def test_padding_does_not_change_real_positions():
    adapter = HFAdapter(tiny_model("llama"), device="cpu")
    ids, _ = batch(B=1, T=6)
    alone = adapter.log_probs(ids)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, :6] = True
    together = adapter.log_probs(torch.cat([padded, padded]), torch.cat([mask, torch.ones_like(mask)]))
    torch.testing.assert_close(together[0, :6], alone[0], rtol=1e-5, atol=1e-5)


def test_keys_and_values_have_adapter_shapes():
    adapter = HFAdapter(tiny_model("gpt2"), device="cpu")
    assert adapter.ffn_keys_all().shape == (adapter.n_layers, adapter.d_ff, adapter.d_model)
    assert adapter.ffn_values_all().shape == (adapter.n_layers, adapter.d_ff, adapter.d_model)
    assert adapter.input_embeddings().shape == (adapter.vocab_size, adapter.d_model)
    assert F.cosine_similarity(adapter.input_embeddings()[3], adapter.model.transformer.wte.weight[3], dim=0) > 0.999


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
    adapter.family = "mystery"
    T = 5
    with pytest.raises(AdapterError) as err:
        with block_attention(adapter, {0: torch.zeros(T, T, dtype=torch.bool)}):
            adapter.run(torch.zeros(1, T, dtype=torch.long))
    msg = str(err.value)
    assert "\n" not in msg and "mystery" in msg and transformers.__version__ in msg
