"""FairseqLMAdapter against the real fairseq: eval-lm parity, old checkpoints, gradients through the adaptive
softmax, Moses tokenization, bad model dirs (the interface contract itself: test_contract.py)."""

from __future__ import annotations

import argparse
import datetime
import shutil

import pytest
import torch

from fflayers import fairseq_tools
from fflayers.backends.fairseq_lm import FairseqLMAdapter
from fflayers.backends.fairseq_loading import load_fairseq_lm
from fflayers.core import ModelError


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
    """Per-token log-probs of each line scored as ``</s> w1..wn`` -> ``w1..wn </s>`` (batched,
    right-padded)."""
    out: list[list[float]] = []
    eos = adapter.dictionary.eos()
    for start in range(0, len(lines), batch_size):
        seqs = [adapter.vocab.tokenize(line) for line in lines[start : start + batch_size]]
        ids, mask = pad_batch(seqs, adapter.vocab.pad_id)
        with torch.no_grad():
            lp = adapter.log_probs(ids, mask)
        for row, seq in enumerate(seqs):
            targets = torch.tensor(seq[1:] + [eos])
            out.append(lp[row, torch.arange(len(seq)), targets].tolist())
    return out


# ----- eval-lm parity ---------------------------------------------------------------------------------------


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


# ----- old checkpoints --------------------------------------------------------------------------------------


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
    seqs = [new.vocab.tokenize(line) for line in sample_lines(trained)]
    ids, mask = pad_batch(seqs, new.vocab.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(old.log_probs(ids, mask), new.log_probs(ids, mask), rtol=0, atol=0)
    assert old.normalize_before == new.normalize_before


# ----- output head ------------------------------------------------------------------------------------------


def test_project_lets_gradients_through_the_adaptive_softmax(fairseq_adapters):
    adapter = fairseq_adapters("fairseq_adaptive_lm")
    h = torch.randn(3, adapter.d_model, requires_grad=True)
    adapter.project(h)[:, -1].sum().backward()  # a tail-band token
    assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


# ----- tokenization -----------------------------------------------------------------------------------------


def test_raw_text_uses_moses_with_wikitext_splits(fairseq_adaptive_lm):
    adapter = load_fairseq_lm(fairseq_adaptive_lm.model_dir, raw_text=True)
    words = adapter.vocab.words('The dark-red city, with 7,100 ships, was "famous".')
    assert words == ["The", "dark", "@-@", "red", "city", ",", "with", "7", "@,@", "100", "ships", ",", "was",
                     '"', "famous", '"', "."]
    assert adapter.vocab.detokenize(adapter.vocab.tokenize("a dark-red city")) == "a dark-red city"


# ----- bad inputs -------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelError) as err:
        load_fairseq_lm(tmp_path / "nowhere")
    assert "does not exist" in _one_line(err)


def test_dir_without_dict(fairseq_plain_lm, tmp_path):
    shutil.copy(fairseq_plain_lm.model_dir / "model.pt", tmp_path / "model.pt")
    with pytest.raises(ModelError) as err:
        load_fairseq_lm(tmp_path)
    assert "dict.txt" in _one_line(err)


def test_dir_without_checkpoint(fairseq_plain_lm, tmp_path):
    shutil.copy(fairseq_plain_lm.model_dir / "dict.txt", tmp_path / "dict.txt")
    with pytest.raises(ModelError) as err:
        load_fairseq_lm(tmp_path)
    assert "model.pt" in _one_line(err)


def test_checkpoint_choice(fairseq_plain_lm, tmp_path):
    shutil.copy(fairseq_plain_lm.model_dir / "dict.txt", tmp_path / "dict.txt")
    shutil.copy(fairseq_plain_lm.model_dir / "model.pt", tmp_path / "checkpoint_last.pt")
    adapter = load_fairseq_lm(tmp_path)  # the only checkpoint
    assert adapter.n_layers == 2
    (tmp_path / "checkpoint_best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError) as err:  # checkpoint_best.pt wins over checkpoint_last.pt
        load_fairseq_lm(tmp_path)
    assert "checkpoint_best.pt" in _one_line(err)
    assert load_fairseq_lm(tmp_path, checkpoint="checkpoint_last.pt").n_layers == 2


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "empty"])
def test_corrupt_checkpoint(corruption, fairseq_plain_lm, tmp_path):
    shutil.copy(fairseq_plain_lm.model_dir / "dict.txt", tmp_path / "dict.txt")
    data = (fairseq_plain_lm.model_dir / "model.pt").read_bytes()
    payloads = {"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 10, "empty": b""}
    payload = payloads[corruption]
    (tmp_path / "model.pt").write_bytes(payload)
    with pytest.raises(ModelError) as err:
        load_fairseq_lm(tmp_path)
    msg = _one_line(err)
    assert "model.pt" in msg and ("corrupt" in msg or "truncated" in msg)


def test_weights_only_refuses_unknown_global_unless_trusted(fairseq_plain_lm, tmp_path):
    state = torch.load(fairseq_plain_lm.model_dir / "model.pt", weights_only=True)
    state["extra_state"]["saved_at"] = datetime.date(2020, 1, 2)
    torch.save(state, tmp_path / "model.pt")
    shutil.copy(fairseq_plain_lm.model_dir / "dict.txt", tmp_path / "dict.txt")
    with pytest.raises(ModelError) as err:
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
    with pytest.raises(ModelError) as err:
        load_fairseq_lm(tmp_path)
    assert "not a fairseq transformer LM" in _one_line(err)
    torch.save({"model": state["model"]}, tmp_path / "model.pt")
    with pytest.raises(ModelError) as err:
        load_fairseq_lm(tmp_path)
    assert "neither 'args' nor 'cfg'" in _one_line(err)


def test_dictionary_that_does_not_fit(fairseq_plain_lm, tmp_path):
    shutil.copy(fairseq_plain_lm.model_dir / "model.pt", tmp_path / "model.pt")
    lines = (fairseq_plain_lm.model_dir / "dict.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "dict.txt").write_text("\n".join(lines[:-5]) + "\n", encoding="utf-8")
    with pytest.raises(ModelError) as err:
        load_fairseq_lm(tmp_path)
    assert "dict.txt" in _one_line(err)
