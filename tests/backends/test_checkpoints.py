"""Safe loading and upgrading of fairseq checkpoints (no trained model needed)."""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import typing

import numpy as np
import pytest
import torch

from fflayers.backends.checkpoints import (
    load_checkpoint,
    namespace_to_config,
    split_fused_attention,
    upgrade_checkpoint,
)
from fflayers.core import ModelError
from tests.fixtures.fairseq_models import NO_FAIRSEQ

# fairseq checkpoints carry omegaconf configs: omegaconf comes with the fairseq extra
omegaconf = pytest.importorskip("omegaconf", reason=NO_FAIRSEQ)
DictConfig, OmegaConf = omegaconf.DictConfig, omegaconf.OmegaConf


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def old_style_args(**overrides) -> argparse.Namespace:
    """A flat argparse Namespace like the ones old fairseq versions stored as ``args``."""
    values = dict(
        arch="transformer_lm_wiki103", task="language_modeling", criterion="adaptive_loss", optimizer="nag",
        lr_scheduler="cosine", data="data-bin/wikitext-103", tokens_per_sample=3072,
        max_target_positions=3072,
        decoder_layers=16, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096, decoder_attention_heads=8,
        adaptive_input=True, adaptive_input_cutoff="20000,60000", adaptive_softmax_cutoff="20000,60000",
        decoder_normalize_before=True, no_decoder_final_norm=True, tie_adaptive_weights=True, lr=[0.0001],
        seed=1, sample_break_mode="none", max_tokens=3072, dropout=0.3,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("zip_format", [True, False])
def test_allow_listed_objects_load_weights_only(tmp_path, zip_format):
    cfg = OmegaConf.create({"model": {"_name": "transformer_lm", "decoder_layers": 2}, "task": {"data": "x"}})
    state = {
        "args": old_style_args(),
        "cfg": cfg,
        "model": collections.OrderedDict(w=torch.arange(6.0).view(2, 3)),
        "extra_state": {"val_loss": np.float64(3.25), "losses": np.array([1.0, 2.0])},
        "any": typing.Any,
    }
    path = tmp_path / "ckpt.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_checkpoint(path)
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"].decoder_layers == 16
    assert isinstance(loaded["cfg"], DictConfig) and loaded["cfg"].model.decoder_layers == 2
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["extra_state"]["val_loss"] == 3.25
    assert loaded["extra_state"]["losses"].tolist() == [1.0, 2.0]
    assert loaded["any"] is typing.Any


class NotAllowed:
    """A class no checkpoint needs."""

    def __init__(self, value):
        self.value = value


@pytest.mark.parametrize("payload", [datetime.date(2020, 1, 2), NotAllowed(3)])
def test_unknown_global_is_refused_with_its_name_unless_trusted(tmp_path, payload):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "args": old_style_args(), "extra": payload}, path)
    with pytest.raises(ModelError) as err:
        load_checkpoint(path)
    msg = _one_line(err)
    expected = "datetime.date" if isinstance(payload, datetime.date) else f"{__name__}.NotAllowed"
    assert expected in msg and "trust_checkpoint=True" in msg and "--trust-checkpoint" in msg
    loaded = load_checkpoint(path, trust_checkpoint=True)
    assert type(loaded["extra"]) is type(payload)


class RunsCommand:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "args": RunsCommand(str(marker))}, path)
    with pytest.raises(ModelError) as err:
        load_checkpoint(path)
    msg = _one_line(err)
    assert not marker.exists()
    assert f"{os.system.__module__}.system" in msg  # posix.system on Linux
    assert "refused" in msg and "nothing in it was executed" in msg and "--trust-checkpoint" in msg
    assert "corrupt" not in msg and msg.endswith("runs its code")


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world, not a checkpoint", bytes(range(256)) * 4, b"\x80\x02garbage after a pickle header"]
)
def test_corrupt_files_give_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError) as err:
        load_checkpoint(path)
    assert "bad.pt" in _one_line(err)


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_checkpoint(tmp_path, zip_format):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.randn(200, 200)}, "args": old_style_args()}, path,
               _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError) as err:
        load_checkpoint(path)
    msg = _one_line(err)
    assert "corrupt or truncated" in msg


def test_missing_file_and_non_fairseq_content(tmp_path):
    with pytest.raises(ModelError) as err:
        load_checkpoint(tmp_path / "nothing.pt")
    assert "does not exist" in _one_line(err)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ModelError) as err:
        load_checkpoint(tmp_path / "plain.pt")
    assert "'model' key missing" in _one_line(err)


def test_split_fused_attention_slices_q_k_v():
    d = 4
    w = torch.arange(3 * d * d, dtype=torch.float32).view(3 * d, d)
    b = torch.arange(3 * d, dtype=torch.float32)
    other = torch.ones(2)
    state = {
        "decoder.layers.0.self_attn.in_proj_weight": w,
        "decoder.layers.0.self_attn.in_proj_bias": b,
        "decoder.layers.0.fc1.weight": other,
    }
    out = split_fused_attention(state)
    assert set(out) == {
        "decoder.layers.0.self_attn.q_proj.weight", "decoder.layers.0.self_attn.k_proj.weight",
        "decoder.layers.0.self_attn.v_proj.weight", "decoder.layers.0.self_attn.q_proj.bias",
        "decoder.layers.0.self_attn.k_proj.bias", "decoder.layers.0.self_attn.v_proj.bias",
        "decoder.layers.0.fc1.weight",
    }
    for i, name in enumerate("qkv"):
        assert torch.equal(out[f"decoder.layers.0.self_attn.{name}_proj.weight"], w[i * d : (i + 1) * d])
        assert torch.equal(out[f"decoder.layers.0.self_attn.{name}_proj.bias"], b[i * d : (i + 1) * d])
    assert out["decoder.layers.0.fc1.weight"] is other
    assert "decoder.layers.0.self_attn.in_proj_weight" in state  # the input is left alone
    with pytest.raises(ModelError):
        split_fused_attention({"a.in_proj_weight": torch.zeros(4, 2)})


def test_namespace_becomes_a_fairseq_config():
    args = old_style_args()
    cfg = namespace_to_config(args)
    assert cfg.model._name == "transformer_lm_wiki103"
    assert cfg.model.decoder_layers == 16 and cfg.model.adaptive_softmax_cutoff == "20000,60000"
    assert cfg.task._name == "language_modeling" and cfg.task.tokens_per_sample == 3072
    assert args.arch == "transformer_lm_wiki103"  # not consumed


def test_upgrade_checkpoint_from_args_and_from_dict_cfg():
    w = torch.randn(6, 2)
    state = {"args": old_style_args(), "model": {"decoder.layers.0.self_attn.in_proj_weight": w}}
    up = upgrade_checkpoint(state)
    assert OmegaConf.is_config(up["cfg"]) and up["cfg"].model.decoder_ffn_embed_dim == 4096
    assert torch.equal(up["model"]["decoder.layers.0.self_attn.v_proj.weight"], w[4:])
    new = {"cfg": {"model": {"_name": "transformer_lm", "decoder_layers": 3},
                   "task": {"_name": "language_modeling"}}, "model": {}}
    up = upgrade_checkpoint(new)
    assert OmegaConf.is_config(up["cfg"]) and up["cfg"].model.decoder_layers == 3
    with pytest.raises(ModelError) as err:
        upgrade_checkpoint({"model": {}})
    assert "neither 'args' nor 'cfg'" in _one_line(err)


def test_object_from_a_module_that_no_longer_exists(tmp_path, monkeypatch):
    """Old fairseq versions pickled objects of modules that are gone (e.g. training meters)."""
    import sys
    import types

    module = types.ModuleType("vanished_fairseq_meters")

    class AverageMeter:
        pass

    AverageMeter.__module__ = module.__name__
    AverageMeter.__qualname__ = "AverageMeter"
    module.AverageMeter = AverageMeter
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "args": old_style_args(),
                "extra_state": {"train_meters": {"loss": AverageMeter()}}}, path)
    monkeypatch.delitem(sys.modules, module.__name__)
    with pytest.raises(ModelError) as err:
        load_checkpoint(path)
    assert "vanished_fairseq_meters.AverageMeter" in _one_line(err)
    with pytest.raises(ModelError) as err:
        load_checkpoint(path, trust_checkpoint=True)
    assert "another fairseq version" in _one_line(err)
