"""Exact trigger targets for subword models: mine -> JSONL -> textual files -> agreement targets, and every
target id must be the token that follows the trigger position in the token ids given to mining (taken from
the mining input, not from a re-tokenization)."""

from __future__ import annotations

import pytest

from fflayers.backends.hf import HFAdapter, load_hf_lm
from fflayers.io import write_jsonl
from fflayers.memories.agreement import targets_from_examples
from fflayers.memories.textual import SubwordTokens, read_target_ids, read_textual_dir, write_textual
from fflayers.memories.trigger_examples import trigger_examples

#: text full of pieces whose strings do not give back their ids (continuations, punctuation, digits, accents)
SENTENCES = [
    "The state-of-the-art model costs $1,000.50 (about 3.14%).",
    "John's naïve café reopened in São Paulo, didn't it?",
    "Tokenizers split antidisestablishmentarianism into many pieces.",
    "She said \"hello\" -- then left; nobody knew why!",
    "In 1999, the GDP grew by 4.2% according to the IMF's report.",
    "Self-attention layers and feed-forward layers alternate.",
]


def expected_targets(adapter: HFAdapter, ids: list[list[int]], trig, layer: int, dim: int) -> list[int]:
    eos = adapter.tokenizer.eos_token_id
    out = []
    for _value, sid, pos in trig.examples(layer, dim):
        seq = ids[sid]
        out.append(seq[pos + 1] if pos + 1 < len(seq) else eos)
    return out


def check_exact_targets(adapter: HFAdapter, tmp_path, layers: list[int], k: int) -> tuple[int, int]:
    """Run the pipeline; assert every stored and agreement target is exact. Returns (n targets, string-lookup
    misses), the latter being how many targets the old string lookup got wrong or unknown."""
    ids = [adapter.vocab.tokenize(s) for s in SENTENCES]
    trig = trigger_examples(adapter, ids, k=k, layers=layers, progress=False)
    jsonl = tmp_path / "trig.jsonl"
    write_jsonl(jsonl, trig.to_jsonl_rows(SENTENCES))
    out = tmp_path / "textual"
    write_textual(jsonl, out, SubwordTokens(adapter.vocab), progress=False)
    stored = read_target_ids(out)
    examples = read_textual_dir(out)
    targets, n_unknown = targets_from_examples(adapter, examples, stored)
    strings_only, _ = targets_from_examples(adapter, examples)
    assert n_unknown == 0
    n = misses = 0
    for layer in layers:
        for dim in range(adapter.d_ff):
            want = expected_targets(adapter, ids, trig, layer, dim)
            if not want:
                continue
            assert stored[layer, dim] == want, (layer, dim)  # file order = rank order
            assert targets[layer, dim] == want, (layer, dim)  # sorted by activation: the same order
            n += len(want)
            misses += sum(a != b for a, b in zip(strings_only[layer, dim], want, strict=True))
    return n, misses


def test_tiny_gpt2_with_real_bpe(tiny_gpt2_dir, tmp_path):
    adapter = load_hf_lm(str(tiny_gpt2_dir), device="cpu")
    n, misses = check_exact_targets(adapter, tmp_path, layers=[0, 1], k=8)
    assert n > 200
    assert misses > 0  # the string lookup this replaces does get some of these wrong


@pytest.mark.real_model
def test_smollm2(smollm2, tmp_path):
    n, _ = check_exact_targets(smollm2, tmp_path, layers=[0, smollm2.n_layers - 1], k=4)
    assert n > 1000


def test_word_level_folders_keep_string_targets(tmp_path):
    """Word-level (fairseq) textual folders carry no id file; targets stay looked up by their strings."""
    from fflayers.memories.textual import WordLevel

    rows = [{"dim": 0, "top_values": [[{"rank": 0, "layer_index": 0, "token_indice": 1, "fc1_value": 2.0,
                                         "text": "the cat sat"}]]}]
    jsonl = tmp_path / "w.jsonl"
    write_jsonl(jsonl, rows)
    write_textual(jsonl, tmp_path / "out", WordLevel(), progress=False)
    assert read_target_ids(tmp_path / "out") is None
    assert read_textual_dir(tmp_path / "out")[0, 0] == [(2.0, "the", "cat")]
