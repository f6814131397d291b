"""Lens files in the tuned-lens layout: a round trip, a folder written by hand in that layout, and a lens for
another model refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import InputError
from fflayers.lenses import TunedLens, load_lens
from tests.fixtures.hf_models import tiny_model


def randomised(lens: TunedLens, seed: int = 0) -> TunedLens:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.translators.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return lens


def test_round_trip_is_bit_identical(llama, tmp_path):
    lens = randomised(TunedLens(llama))
    lens.save(tmp_path / "lens")
    back = load_lens(tmp_path / "lens", llama)
    for (k, a), (k2, b) in zip(lens.translators.state_dict().items(), back.translators.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b)
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert config["d_model"] == llama.d_model and config["num_hidden_layers"] == llama.n_layers
    assert config["lens_type"] == "linear_tuned_lens" and config["bias"] is True
    h = torch.randn(4, llama.d_model)
    assert torch.equal(lens.log_probs(h, 1), back.log_probs(h, 1))


def test_a_folder_in_the_tuned_lens_layout_written_by_hand(llama, tmp_path):
    d, L = llama.d_model, llama.n_layers
    g = torch.Generator().manual_seed(1)
    state = {}
    for layer in range(L):
        state[f"{layer}.weight"] = torch.randn(d, d, generator=g)
        state[f"{layer}.bias"] = torch.randn(d, generator=g)
    folder = tmp_path / "hub_lens"
    folder.mkdir()
    torch.save(state, folder / "params.pt")
    (folder / "config.json").write_text(json.dumps({
        "base_model_name_or_path": "tiny", "d_model": d, "num_hidden_layers": L, "bias": True,
        "base_model_revision": None, "unembed_hash": "abc", "lens_type": "linear_tuned_lens"}))
    lens = load_lens(folder, llama)
    h = torch.randn(5, d, generator=g)
    for layer in range(L):
        want = h + h @ state[f"{layer}.weight"].T + state[f"{layer}.bias"]
        torch.testing.assert_close(lens.transform(h, layer), want)


def test_lens_of_another_model_or_size_is_refused(llama, tmp_path):
    randomised(TunedLens(llama)).save(tmp_path / "lens")
    other = HFAdapter(tiny_model("llama", seed=7), device="cpu")
    with pytest.raises(InputError, match=r"was trained for model [0-9a-f]{12}, this model is [0-9a-f]{12}"):
        load_lens(tmp_path / "lens", other)
    gpt2 = HFAdapter(tiny_model("gpt2"), device="cpu")
    (tmp_path / "lens" / "fflayers_lens.json").unlink()
    cfg = json.loads((tmp_path / "lens" / "config.json").read_text())
    (tmp_path / "lens" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    with pytest.raises(InputError, match="lens for 5 layers, but the model has 3"):
        load_lens(tmp_path / "lens", gpt2)
    with pytest.raises(InputError, match="config.json is missing: a lens folder holds config.json"):
        load_lens(tmp_path / "nothing", gpt2)
