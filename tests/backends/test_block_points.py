"""attn_in / mlp_in hook points and block layouts, recomputed from each architecture's own norm modules."""

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.hooks import capture, intervene, replace
from tests.fixtures.hf_models import HF_ARCHS, tiny_model

# (layout, ln1, ln2) per architecture, block-relative; written here independently of the adapter's table
NORMS = {
    "gpt2": ("pre_norm", "ln_1", "ln_2"),
    "gpt_neo": ("pre_norm", "ln_1", "ln_2"),
    "gptj": ("parallel", "ln_1", "ln_1"),
    "gpt_neox": ("parallel", "input_layernorm", "post_attention_layernorm"),
    "llama": ("pre_norm", "input_layernorm", "post_attention_layernorm"),
    "bert": ("post_norm", None, "attention.output.LayerNorm"),
}
FAIRSEQ = ["fairseq_plain_lm", "fairseq_adaptive_lm", "fairseq_prenorm_lm"]
IDS = torch.tensor([[11, 5, 9, 13, 7, 12], [4, 4, 8, 10, 6, 5]])  # no special or padding ids


def _module(block, path):
    for part in path.split("."):
        block = getattr(block, part)
    return block


def _check_points(adapter, layout, norm1, norm2):
    assert adapter.block_layout == layout
    with torch.no_grad(), capture(adapter, ["resid_pre", "attn_in", "attn_out", "mlp_in", "mlp_out", "resid_post"]) as c:
        adapter.run(IDS)
    for layer in range(adapter.n_layers):
        x, a_in, a_out, m_in = (c[p, layer] for p in ("resid_pre", "attn_in", "attn_out", "mlp_in"))
        want_a_in = x if norm1 is None else norm1(layer)(x)
        want_m_in = norm2(layer)(x if layout == "parallel" else x + a_out)
        torch.testing.assert_close(a_in, want_a_in, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m_in, want_m_in, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_hf_points(arch):
    adapter = HFAdapter(tiny_model(arch), device="cpu")
    layout, ln1, ln2 = NORMS[arch]
    blocks = adapter.blocks
    _check_points(adapter, layout, None if ln1 is None else (lambda i: _module(blocks[i], ln1)),
                  lambda i: _module(blocks[i], ln2))


@pytest.mark.parametrize("name", FAIRSEQ)
def test_fairseq_points(name, fairseq_adapters):
    adapter = fairseq_adapters(name)
    blocks = adapter.layers
    pre = adapter.normalize_before
    tf = lambda m: lambda x: m(x.transpose(0, 1)).transpose(0, 1)  # noqa: E731 - fairseq modules are time-first
    _check_points(adapter, "pre_norm" if pre else "post_norm",
                  (lambda i: tf(blocks[i].self_attn_layer_norm)) if pre else None,
                  lambda i: tf(blocks[i].final_layer_norm if pre else blocks[i].self_attn_layer_norm))


def _attn_of_zero_input(adapter, layer):
    """Attention output for an all-zero input: equal scores, so every position reads the value bias."""
    w = adapter.attention_weights(layer)
    v = torch.zeros(adapter.d_model) if w.b_V is None else w.b_V.reshape(-1)
    out = torch.einsum("hd,hdm->m", v.reshape(w.W_O.shape[0], -1), w.W_O)
    return out + (0 if w.b_O is None else w.b_O)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_hf_attn_in_edit_reaches_query_key_value(arch):
    adapter = HFAdapter(tiny_model(arch), device="cpu")
    with torch.no_grad(), intervene(adapter, [replace("attn_in", 1, 0.0)]), capture(adapter, "attn_out", [1]) as c:
        adapter.run(IDS)
    want = _attn_of_zero_input(adapter, 1).expand_as(c["attn_out", 1])
    torch.testing.assert_close(c["attn_out", 1], want, rtol=1e-5, atol=1e-5)


def test_fairseq_attn_in_edit_reaches_query_key_value(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_prenorm_lm")
    with torch.no_grad(), intervene(adapter, [replace("attn_in", 0, 0.0)]), capture(adapter, "attn_out", [0]) as c:
        adapter.run(IDS)
    want = _attn_of_zero_input(adapter, 0).expand_as(c["attn_out", 0])
    torch.testing.assert_close(c["attn_out", 0], want, rtol=1e-5, atol=1e-5)


def test_llama_mlp_in_edit_feeds_gate_and_up():
    adapter = HFAdapter(tiny_model("llama"), device="cpu")
    v = torch.randn(adapter.d_model)
    with torch.no_grad(), intervene(adapter, [replace("mlp_in", 0, v)]), capture(adapter, "mlp_out", [0]) as c:
        adapter.run(IDS)
        want = adapter.blocks[0].mlp(v)
    torch.testing.assert_close(c["mlp_out", 0], want.expand_as(c["mlp_out", 0]), rtol=1e-5, atol=1e-5)
