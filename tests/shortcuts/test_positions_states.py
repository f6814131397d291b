"""Sampled positions and the states read at them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from fflayers.backends.hf import HFAdapter
from fflayers.core import FflayersError
from fflayers.shortcuts import (
    Position,
    collect_states,
    iter_state_batches,
    positions_frame,
    positions_from_frame,
    sample_positions,
)
from tests.fixtures.hf_models import POS, VOCAB, tiny_model

MASK = VOCAB - 1


def random_sentences(n: int, seed: int = 0, lo: int = 2, hi: int = 12,
                     frame: int | None = None) -> list[list[int]]:
    """Random ids in 5..MASK-1 (no special ids); ``frame`` wraps each sentence in that id."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(5, MASK, int(rng.integers(lo, hi))).tolist()
        out.append([frame, *ids, frame] if frame is not None else ids)
    return out


@pytest.fixture(scope="module")
def adapters() -> dict[str, HFAdapter]:
    return {arch: HFAdapter(tiny_model(arch), device="cpu") for arch in ("gpt2", "llama", "bert")}


def with_bos(adapter: HFAdapter, bos: int) -> HFAdapter:
    return HFAdapter(adapter.model, tokenizer=SimpleNamespace(bos_token_id=bos, pad_token_id=bos),
                     device="cpu")


# ----- positions --------------------------------------------------------------------------------------------


def test_causal_positions_skip_bos_and_follow_the_seeded_rng(adapters):
    adapter = with_bos(adapters["gpt2"], bos=1)
    sentences = [[1, *s] for s in random_sentences(40, seed=1)] + [[1]] + [[7, 8, 9]]
    pos = sample_positions(adapter, sentences, seed=5)
    assert [p.sentence_index for p in pos] == [*range(40), 41]  # the lone BOS is skipped
    rng = np.random.default_rng(5)
    for p in pos:
        ids = sentences[p.sentence_index]
        start = 1 if ids[0] == 1 else 0
        assert p.position == start + int(rng.integers(len(ids) - start))
        assert p.input_ids == tuple(ids[: p.position + 1]) and p.read_at == p.position
    assert sample_positions(adapter, sentences, seed=5) == pos
    assert sample_positions(adapter, sentences, seed=6) != pos


def test_causal_positions_cover_every_real_token_and_stay_in_the_window(adapters):
    adapter = with_bos(adapters["gpt2"], bos=1)
    pos = sample_positions(adapter, [[1, 5, 6, 7, 8]] * 200)
    assert {p.position for p in pos} == {1, 2, 3, 4}
    long = sample_positions(adapters["gpt2"], [[5 + t % 90 for t in range(2 * POS)]] * 50)
    assert max(p.position for p in long) < POS and max(len(p.input_ids) for p in long) <= POS


def test_masked_positions_replace_a_non_special_token(adapters):
    adapter = adapters["bert"]
    sentences = random_sentences(30, seed=2, frame=0) + [[0, 0]]
    with pytest.raises(FflayersError, match="mask"):
        sample_positions(adapter, sentences)
    pos = sample_positions(adapter, sentences, mask_id=MASK)
    assert [p.sentence_index for p in pos] == list(range(30))
    for p in pos:
        ids = sentences[p.sentence_index]
        assert 0 < p.position < len(ids) - 1 and p.read_at == p.position
        assert p.input_ids[p.position] == MASK
        assert p.input_ids[: p.position] + p.input_ids[p.position + 1 :] == tuple(
            ids[: p.position] + ids[p.position + 1 :])
    with pytest.raises(FflayersError, match="none of the 1 sentences"):
        sample_positions(adapter, [[0, 0, 0]], mask_id=MASK)


def test_masked_positions_use_the_tokenizer(adapters):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    adapter = HFAdapter(adapters["bert"].model, tokenizer=tok, device="cpu")
    sentences = [adapter.vocab.tokenize("w1 w2 w3 w4")] * 50
    assert sentences[0][0] == tok.cls_token_id and sentences[0][-1] == tok.sep_token_id
    pos = sample_positions(adapter, sentences)
    assert {p.position for p in pos} == {1, 2, 3, 4}
    assert all(p.input_ids[p.position] == tok.mask_token_id for p in pos)


def test_positions_frame_and_bad_input(adapters):
    pos = sample_positions(adapters["gpt2"], [[5, 6, 7], [8, 9]])
    df = positions_frame(pos, "train")
    assert list(df.columns) == ["split", "sentence_index", "position", "input_ids"]
    assert df["split"].tolist() == ["train", "train"] and df["sentence_index"].tolist() == [0, 1]
    assert df["input_ids"].tolist() == [list(p.input_ids) for p in pos]
    for bad in ([], ["some text"], "text"):
        with pytest.raises(FflayersError):
            sample_positions(adapters["gpt2"], bad)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_positions_from_frame_inverts_positions_frame(adapters, arch, tmp_path):
    """Causal (read at the prefix end) and masked (read at the masked row) positions survive a parquet round
    trip."""
    frame = [2] if arch == "bert" else None
    pos = sample_positions(adapters[arch], random_sentences(6, seed=3, frame=frame[0] if frame else None),
                           seed=4, **({"mask_id": MASK} if arch == "bert" else {}))
    path = tmp_path / "p.parquet"
    pd.concat([positions_frame(pos, "val"), positions_frame(pos[:2], "train")]).to_parquet(path)
    assert positions_from_frame(pd.read_parquet(path), "val") == pos


# ----- states -----------------------------------------------------------------------------------------------


def reference_states(adapter: HFAdapter, p: Position) -> torch.Tensor:
    """``[L+1, d]`` of one position from the model's own ``output_hidden_states`` (unbatched, no padding); the
    last state from a hook on the last block, because HF applies the final norm to its last hidden state."""
    last = {}

    def keep(_module, _args, output) -> None:
        last["h"] = output[0] if isinstance(output, tuple) else output

    handle = adapter.blocks[-1].register_forward_hook(keep)
    try:
        with torch.no_grad():
            out = adapter.model.base_model(input_ids=torch.tensor([p.input_ids]), output_hidden_states=True)
    finally:
        handle.remove()
    hs = out.hidden_states
    assert len(hs) == adapter.n_layers + 1
    return torch.stack([h[0, p.read_at] for h in hs[:-1]] + [last["h"][0, p.read_at]])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_states_equal_unbatched_hidden_states(adapters, arch):
    adapter = adapters[arch]
    if arch == "bert":
        pos = sample_positions(adapter, random_sentences(10, seed=3, frame=0), mask_id=MASK)
    else:
        pos = sample_positions(adapter, random_sentences(10, seed=3, lo=2, hi=20))
    assert len({len(p.input_ids) for p in pos}) > 2  # batches are padded
    states = collect_states(adapter, pos, batch_size=4)
    assert states.shape == (len(pos), adapter.n_layers + 1, adapter.d_model)
    assert states.dtype == torch.float32 and states.device.type == "cpu"
    for k, p in enumerate(pos):
        torch.testing.assert_close(states[k], reference_states(adapter, p), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(collect_states(adapter, pos, batch_size=1), states, atol=1e-5, rtol=1e-5)


def test_iter_state_batches_and_bad_input(adapters):
    adapter = adapters["gpt2"]
    pos = sample_positions(adapter, random_sentences(7, seed=4))
    shapes = [tuple(b.shape) for b in iter_state_batches(adapter, pos, batch_size=3)]
    assert shapes == [(3, 4, 32), (3, 4, 32), (1, 4, 32)]
    with pytest.raises(FflayersError, match="no positions"):
        collect_states(adapter, [])
    with pytest.raises(FflayersError, match="batch_size"):
        iter_state_batches(adapter, pos, batch_size=0)
    with pytest.raises(FflayersError, match="reads row"):
        collect_states(adapter, [Position(0, 3, (5, 6), 3)])
