"""The HF adapter on real offline models: SmolLM2-135M (Llama) and all-MiniLM-L6-v2 (BERT encoder)."""

from __future__ import annotations

import pytest
import torch

from fflayers.core import ModelError
from fflayers.hooks import block_attention, capture

pytestmark = pytest.mark.real_model


def test_smollm2_knows_the_capital_of_france(smollm2):
    ids = torch.tensor([smollm2.vocab.tokenize("The capital of France is")])
    lp = smollm2.log_probs(ids)[0, -1]
    top = int(lp.argmax())
    assert smollm2.vocab.id_to_token([top])[0].strip() == "Paris"
    assert lp[top].exp() > 0.5
    # the adapter's head equals the model's own logits
    ref = torch.log_softmax(smollm2.model(input_ids=ids).logits[0, -1].float(), -1)
    torch.testing.assert_close(lp, ref, rtol=1e-4, atol=1e-4)


def test_smollm2_gated_mlp_hooks_match_weights(smollm2):
    ids = torch.tensor([smollm2.vocab.tokenize("Feed-forward layers are key-value memories.")])
    layer = 7
    with capture(smollm2, ["resid_pre", "attn_out", "mlp_key", "mlp_coef", "mlp_out", "resid_post"],
                 [layer]) as c:
        smollm2.run(ids)
    block = smollm2.blocks[layer]
    x = block.post_attention_layernorm(c["resid_pre", layer] + c["attn_out", layer])
    key = x @ smollm2.ffn_keys(layer).T
    torch.testing.assert_close(c["mlp_key", layer], key, rtol=1e-4, atol=1e-4)
    coef = torch.nn.functional.silu(key) * (x @ block.mlp.up_proj.weight.T)
    torch.testing.assert_close(c["mlp_coef", layer], coef, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c["mlp_out", layer], coef @ smollm2.ffn_values(layer), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c["resid_post", layer],
                               x.new_tensor(0) + c["resid_pre", layer] + c["attn_out", layer]
                               + c["mlp_out", layer], rtol=1e-4, atol=1e-4)


def test_smollm2_blocking_last_token_edges_to_subject_changes_prediction(smollm2):
    ids = torch.tensor([smollm2.vocab.tokenize("The capital of France is")])
    T = ids.shape[1]
    plain = smollm2.log_probs(ids)[0, -1]
    paris = int(plain.argmax())
    france = [i for i, t in enumerate(smollm2.vocab.id_to_token(ids[0].tolist())) if "France" in t]
    blocked = torch.zeros(T, T, dtype=torch.bool)
    blocked[T - 1, france] = True
    with block_attention(smollm2, {layer: blocked for layer in range(smollm2.n_layers)}):
        knocked = smollm2.log_probs(ids)[0, -1]
    assert knocked[paris] < plain[paris] - 1.0


def test_minilm_encoder_hooks_match_weights(minilm):
    ids = torch.tensor([minilm.vocab.tokenize("Paris is the capital of France.")])
    layer = 2
    with capture(minilm, ["resid_pre", "attn_out", "mlp_key", "mlp_coef", "mlp_out", "resid_post"],
                 [layer]) as c:
        minilm.run(ids)
    block = minilm.blocks[layer]
    mid = block.attention.output.LayerNorm(c["attn_out", layer] + c["resid_pre", layer])
    key = mid @ minilm.ffn_keys(layer).T + block.intermediate.dense.bias
    torch.testing.assert_close(c["mlp_key", layer], key, rtol=1e-4, atol=1e-4)
    out = torch.nn.functional.gelu(key) @ minilm.ffn_values(layer) + block.output.dense.bias
    torch.testing.assert_close(c["mlp_out", layer], out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c["resid_post", layer], block.output.LayerNorm(out + mid),
                               rtol=1e-4, atol=1e-4)


def test_minilm_without_mlm_head_says_so(minilm):
    with pytest.raises(ModelError, match="no output head"):
        minilm.project(torch.zeros(1, minilm.d_model))


def test_smollm2_saved_dequantized_loads_fast_and_equal(smollm2, tmp_path):
    from fflayers.assets import save_dequantized
    from fflayers.backends.hf import load_hf_lm

    folder = save_dequantized(smollm2, tmp_path / "smollm2")
    plain = load_hf_lm(str(folder), device="cpu")
    assert not hasattr(plain.model.config, "quantization_config") and not (tmp_path / "smollm2.tmp").exists()
    text = "The Eiffel Tower is located in"
    assert plain.vocab.tokenize(text) == smollm2.vocab.tokenize(text)
    ids = torch.tensor([smollm2.vocab.tokenize(text)])
    with torch.no_grad():
        torch.testing.assert_close(plain.log_probs(ids), smollm2.log_probs(ids.to(smollm2.device)).cpu())
