"""Tuned-lens training: a planted problem it must solve, resume after an interruption equal to one run, and
the refusals (another config, too little text, a diverging loss)."""

from __future__ import annotations

import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import InputError, RunStateError
from fflayers.lenses import LensTrainConfig, LensTrainingError, LogitLens, TunedLens, train_lens
from fflayers.lenses.training import kl_loss, step_batches, train_lens_on_states
from tests.fixtures.hf_models import tiny_model
from tests.lenses.conftest import sequences


def planted_states(adapter, layer: int, n: int = 256, seed: int = 0):
    """States whose final state is a known affine map of the layer-``layer`` state."""
    g = torch.Generator().manual_seed(seed)
    d, L = adapter.d_model, adapter.n_layers
    A = torch.eye(d) + torch.randn(d, d, generator=g) / d**0.5
    b = 0.5 * torch.randn(d, generator=g)
    states = torch.zeros(n, L + 1, d)
    states[:, layer] = 2 * torch.randn(n, d, generator=g)
    states[:, L] = states[:, layer] @ A.T + b
    return states


def test_the_tuned_lens_recovers_a_planted_affine_map():
    model = tiny_model("llama")
    with torch.no_grad():  # a sharper head than random init gives, so that readings differ
        model.lm_head.weight.mul_(60)
    llama = HFAdapter(model, device="cpu")
    layer, L = 1, llama.n_layers
    states = planted_states(llama, layer)
    config = LensTrainConfig(steps=300, tokens_per_step=1, optimizer="adam", lr=0.03, weight_decay=0.0,
                             clip_grad_norm=None, layers=(layer,))
    lens, losses = train_lens_on_states(llama, lambda step: iter([(states, 1.0)]), config, progress=False)
    with torch.no_grad():
        final = llama.project(states[:, L]).float()
        before = float(kl_loss(final, LogitLens(llama).log_probs(states[:, layer], layer)))
        after = float(kl_loss(final, lens.log_probs(states[:, layer], layer)))
    assert before > 0.3
    assert after < 0.01 * before and after < 5e-3
    assert losses[0] == pytest.approx(before, rel=1e-5) and losses[-1] < losses[0]
    # untrained layers keep zero translators
    assert all(float(p.detach().abs().sum()) == 0 for p in lens.translators[0].parameters())


def test_resumed_training_equals_an_uninterrupted_run(llama, tmp_path):
    seqs = sequences(12, seed=2)
    config = LensTrainConfig(steps=5, tokens_per_step=20, batch_tokens=24, lr=0.5)
    whole, whole_losses = train_lens(llama, seqs, config, progress=False)

    class Killed(Exception):
        pass

    def kill_after_two(step, _loss):
        if step == 2:
            raise Killed

    ckpt = tmp_path / "lens.ckpt"
    with pytest.raises(Killed):
        train_lens(llama, seqs, config, checkpoint=ckpt, save_every=1, progress=False, on_step=kill_after_two)
    seen = []
    resumed, losses = train_lens(llama, seqs, config, checkpoint=ckpt, save_every=1, progress=False,
                                 on_step=lambda step, _loss: seen.append(step))
    assert seen == [3, 4, 5]  # only the unfinished steps ran
    assert losses == whole_losses
    for a, b in zip(whole.translators.parameters(), resumed.translators.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RunStateError, match=r"lr: 0\.25 here, 0\.5 in the checkpoint"):
        train_lens(llama, seqs, LensTrainConfig(steps=5, tokens_per_step=20, batch_tokens=24, lr=0.25),
                   checkpoint=ckpt, progress=False)


def test_step_batches_cycle_in_order():
    assert step_batches([3, 4, 5], steps=3, tokens_per_step=6) == [[0, 1], [2, 0], [1, 2]]
    with pytest.raises(InputError, match="has 12 tokens, fewer than one step of 13"):
        step_batches([3, 4, 5], steps=1, tokens_per_step=13)


def test_refusals(llama, tmp_path):
    with pytest.raises(InputError, match="fewer than one step"):
        train_lens(llama, sequences(2), LensTrainConfig(steps=1, tokens_per_step=10**6), progress=False)
    with pytest.raises(InputError, match="no training text"):
        train_lens(llama, [[]], LensTrainConfig(steps=1), progress=False)
    with pytest.raises(InputError, match=r"lens layers \[7\] out of range"):
        train_lens(llama, sequences(4), LensTrainConfig(steps=1, tokens_per_step=5, layers=(7,)),
                   progress=False)
    with pytest.raises(InputError, match="optimizer 'lbfgs' unknown"):
        LensTrainConfig(optimizer="lbfgs")
    states = planted_states(llama, 0)
    states[0, 0] = float("inf")
    with pytest.raises(LensTrainingError, match="diverged at step 0: loss nan"):
        train_lens_on_states(llama, lambda step: iter([(states, 1.0)]),
                             LensTrainConfig(steps=3, tokens_per_step=1, layers=(0,)), progress=False)
    lens = TunedLens(llama)
    with torch.no_grad():
        lens.translators[0].weight[0, 0] = float("nan")
    with pytest.raises(Exception, match="not finite; nothing saved"):
        lens.save(tmp_path / "nan_lens")
    assert not (tmp_path / "nan_lens" / "params.pt").exists()
