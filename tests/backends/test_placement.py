"""Models placed with a device map (transformers + accelerate): some blocks kept in CPU memory, one offloaded
to disk, against the same weights loaded whole: captured activations, projections, FFN keys and values,
attention weights and an activation edit are equal; weight edits of an offloaded block are refused in one
line; the device-map and max-memory options parse or fail in one line."""

from __future__ import annotations

import json

import pytest
import torch

from fflayers.backends.hf import load_hf_lm
from fflayers.backends.hf_placement import is_offloaded, parse_device_map, parse_max_memory
from fflayers.core import InputError, ModelError
from fflayers.hooks import capture, intervene, scale
from tests.backends.conftest import hf_model
from tests.fixtures.hf_models import LAYERS

pytest.importorskip("accelerate")

POINTS = ["resid_pre", "attn_out", "mlp_key", "mlp_coef", "mlp_out", "resid_post"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def folder(request, tmp_path_factory, tiny_gpt2_dir):
    """A tiny random model of 2 blocks (read with the GPT-2 tokenizer of ``tiny_gpt2_dir``)."""
    path = tmp_path_factory.mktemp(f"placed_{request.param}")
    hf_model(request.param).save_pretrained(path)
    return request.param, path, str(tiny_gpt2_dir)


def device_map(arch: str) -> dict:
    """Everything in CPU memory but the middle block, which goes to disk (LAYERS blocks)."""
    top, blocks = ("model.", "model.layers") if arch == "llama" else ("transformer.", "transformer.h")
    parts = ["embed_tokens", "rotary_emb", "norm"] if arch == "llama" else ["wte", "wpe", "ln_f"]
    mapping = {top + part: "cpu" for part in parts} | {"lm_head": "cpu"}
    return mapping | {f"{blocks}.{i}": "disk" if i == 1 else "cpu" for i in range(LAYERS)}


@pytest.fixture(scope="module")
def pair(folder, tmp_path_factory):
    arch, path, tok = folder
    whole = load_hf_lm(str(path), device="cpu", tokenizer_path=tok)
    placed = load_hf_lm(str(path), tokenizer_path=tok, device_map=json.dumps(device_map(arch)),
                        offload_folder=str(tmp_path_factory.mktemp("offload")))
    return arch, whole, placed


def test_the_offloaded_block_is_really_on_disk(pair):
    _, _, placed = pair
    assert placed.device == torch.device("cpu")
    assert "disk" in set(placed.model.hf_device_map.values())
    offloaded = [is_offloaded(p) for p in placed.blocks[1].parameters()]
    assert offloaded and all(offloaded)
    assert not any(is_offloaded(p) for p in placed.blocks[0].parameters())


@torch.no_grad()
def test_activations_projections_and_weights_equal_the_whole_model(pair):
    _, whole, placed = pair
    ids = torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    with capture(whole, POINTS) as a:
        lp_whole = whole.log_probs(ids)
    with capture(placed, POINTS) as b:
        lp_placed = placed.log_probs(ids)
    torch.testing.assert_close(lp_placed, lp_whole)
    for key in a.keys():
        torch.testing.assert_close(b[key], a[key])
    h = a["resid_post", 1][:, -1]
    torch.testing.assert_close(placed.project(h), whole.project(h))
    for layer in (0, 1):
        for read in ("ffn_keys", "ffn_values"):
            got = getattr(placed, read)(layer)
            assert not is_offloaded(got)
            torch.testing.assert_close(got, getattr(whole, read)(layer))
        wa, wb = whole.attention_weights(layer), placed.attention_weights(layer)
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_O"):
            if getattr(wa, name) is not None:
                torch.testing.assert_close(getattr(wb, name), getattr(wa, name))
    torch.testing.assert_close(placed.output_embeddings(), whole.output_embeddings())
    torch.testing.assert_close(placed.input_embeddings(), whole.input_embeddings())


@torch.no_grad()
def test_an_activation_edit_in_the_offloaded_block_equals_the_whole_model(pair):
    _, whole, placed = pair
    ids = torch.randint(1, 90, (1, 6), generator=torch.Generator().manual_seed(1))
    edit = [scale("mlp_coef", 1, 0.0, index=[0, 3, 5]), scale("attn_out", 1, 2.0, positions=[4])]
    with intervene(whole, edit):
        want = whole.log_probs(ids)
    with intervene(placed, edit):
        got = placed.log_probs(ids)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, whole.log_probs(ids))


def test_weight_edits_of_an_offloaded_block_are_refused(pair):
    _, _, placed = pair
    with pytest.raises(ModelError, match="block 1 is offloaded"):
        placed.write_ffn_values(1, [0], torch.zeros(1, placed.d_model))
    saved = placed.ffn_values(0)[:1].clone()  # a block in memory is edited in place, as without a map
    placed.write_ffn_values(0, [0], torch.zeros(1, placed.d_model))
    assert placed.ffn_values(0)[0].abs().sum() == 0
    placed.write_ffn_values(0, [0], saved)


def test_placement_options_parse_or_fail_in_one_line(tmp_path):
    assert parse_device_map("auto") == "auto"
    mapping = {"model.layers.0": 0, "lm_head": "cpu"}
    assert parse_device_map(json.dumps(mapping)) == mapping
    path = tmp_path / "map.json"
    path.write_text('{"": "cpu"}')
    assert parse_device_map(str(path)) == {"": "cpu"}
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory('{"0": "8GiB", "cpu": "1GiB"}') == {0: "8GiB", "cpu": "1GiB"}
    for bad, words in (("everywhere", "neither a strategy"), ("[1, 2]", "non-empty object"),
                       ("{}", "non-empty")):
        with pytest.raises(InputError, match=words):
            parse_device_map(bad)
    for bad in ("lots", "0:20GiB", ","):
        with pytest.raises(InputError, match="--max_memory"):
            parse_max_memory(bad)


def test_max_memory_without_a_device_map_is_refused(folder):
    _, path, tok = folder
    with pytest.raises(InputError, match="go with a device_map"):
        load_hf_lm(str(path), device="cpu", max_memory="cpu=1GiB", tokenizer_path=tok)
