"""Interop with the tuned-lens package itself (installed from the lock, without its training dependencies): a
lens saved here loads there and reads states as it does here, and a lens the package saves loads here with
the same translators and the same log-probs through the model's own final norm and head."""

from __future__ import annotations

import pytest
import torch

from fflayers.lenses import TunedLens, load_lens
from tests.lenses.test_files import randomised

tuned_lens = pytest.importorskip("tuned_lens.nn.lenses", reason="the tuned-lens package is not installed")


@pytest.mark.parametrize("source", ["fflayers", "tuned-lens"])
def test_a_lens_saved_by_one_reads_states_as_the_other(lm, tmp_path, source):
    folder = tmp_path / "lens"
    if source == "fflayers":
        ours = randomised(TunedLens(lm), seed=3)
        ours.save(folder)
        theirs = tuned_lens.TunedLens.from_model_and_pretrained(lm.model, lens_resource_id=str(folder))
    else:
        theirs = tuned_lens.TunedLens.from_model(lm.model)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in theirs.layer_translators.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        theirs.save(str(folder))
        ours = load_lens(folder, lm)
    h = torch.randn(5, lm.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in range(lm.n_layers):
            torch.testing.assert_close(ours.transform(h, layer), theirs.transform_hidden(h, layer))
            torch.testing.assert_close(ours.log_probs(h, layer),
                                       torch.log_softmax(theirs.forward(h, layer).float(), dim=-1))
        assert not torch.allclose(ours.transform(h, 0), h)  # the translators are not the identity
