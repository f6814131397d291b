import random

import pytest

from fflayers.core import FflayersError
from fflayers.data.sentences import (
    shuffled_sentences,
    split_pretokenized_line,
    split_raw_text,
    split_sentences,
)

# Pre-tokenized lines with their expected sentences (WikiText conventions).
KNOWN = [
    ("The cat sat . It ran .", ["The cat sat .", "It ran ."]),
    (
        "Mr. Smith went to the U.S. in 1990 . He paid 3 @.@ 5 dollars ( about 1 @,@ 000 yen ) . "
        "The self @-@ made man did n't care .",
        [
            "Mr. Smith went to the U.S. in 1990 .",
            "He paid 3 @.@ 5 dollars ( about 1 @,@ 000 yen ) .",
            "The self @-@ made man did n't care .",
        ],
    ),
    ('" Why ? " he asked . Then he left !', ['" Why ? " he asked .', "Then he left !"]),
    ("no final punctuation here", ["no final punctuation here"]),
]


@pytest.mark.parametrize("line, expected", KNOWN)
def test_known_pretokenized_splits(line, expected):
    assert split_pretokenized_line(line) == expected


def _random_wikitext_line(rng: random.Random) -> str:
    words = [
        "the",
        "Cat",
        "U.S.",
        "Dr.",
        "3",
        "1990",
        "n't",
        "'s",
        "(",
        ")",
        '"',
        "@-@",
        "@,@",
        "@.@",
        "<unk>",
        "e.g.",
        "a",
        "Paris",
        "No.",
        "Mt.",
        "...",
    ]
    ends = [".", "!", "?", ";", ","]
    toks: list[str] = []
    for _ in range(rng.randint(1, 6)):
        toks += rng.choices(words, k=rng.randint(1, 12)) + [rng.choice(ends)]
    return "  ".join(toks) if rng.random() < 0.1 else " ".join(toks)  # some lines with double spaces


def test_pretokenized_split_preserves_tokens_exactly():
    rng = random.Random(1234)
    lines = [_random_wikitext_line(rng) for _ in range(300)] + [line for line, _ in KNOWN]
    n_multi = 0
    for line in lines:
        sents = split_pretokenized_line(line)
        assert [t for s in sents for t in s.split(" ")] == line.split()
        assert all(s and s == " ".join(s.split()) for s in sents)  # single spaces, no padding
        n_multi += len(sents) > 1
    assert n_multi > 50  # the splitter actually splits


def test_escapes_are_never_cut():
    line = "It is 3 @.@ 5 m long . Prices rose 1 @,@ 000 @.@ 5 % in the U.S. . Then it fell ."
    sents = split_pretokenized_line(line)
    for s in sents:
        toks = s.split()
        assert toks[0] not in {"@.@", "@,@", "@-@"} and toks[-1] not in {"@.@", "@,@", "@-@"}
    assert sents[0] == "It is 3 @.@ 5 m long ."


def test_raw_text_uses_pysbd():
    assert split_raw_text("My name is Jonas E. Smith.   Please turn to p. 55. ") == [
        "My name is Jonas E. Smith.",
        "Please turn to p. 55.",
    ]
    assert split_raw_text("   ") == []


def test_split_sentences_flattens_in_order():
    lines = ["A b . C d .", "E f .", "G h ! I j ?"]
    assert split_sentences(lines, pretokenized=True) == ["A b .", "C d .", "E f .", "G h !", "I j ?"]
    assert split_sentences(["One here. Two there.", "Three."], pretokenized=False) == [
        "One here.",
        "Two there.",
        "Three.",
    ]
    with pytest.raises(FflayersError):
        split_sentences("A b . C d .", pretokenized=True)


def _numbered_lines(n: int) -> tuple[list[str], dict[str, list[str]]]:
    """Lines of two known sentences each."""
    lines, sents = [], {}
    for i in range(n):
        line = f"Line {i} starts here . Line {i} ends here ."
        lines.append(line)
        sents[line] = [f"Line {i} starts here .", f"Line {i} ends here ."]
    return lines, sents


def test_shuffled_sentences_follow_seeded_line_shuffle():
    lines, sents = _numbered_lines(30)
    original = list(lines)
    order = list(range(30))
    random.Random(7).shuffle(order)
    expected = [s for i in order for s in sents[lines[i]]]
    assert shuffled_sentences(lines, seed=7, max_sentences=-1, pretokenized=True) == expected
    assert lines == original  # input untouched
    # deterministic, and the seed matters
    assert shuffled_sentences(lines, seed=7) == expected
    assert shuffled_sentences(lines, seed=8) != expected


def test_shuffled_sentences_max_sentences():
    lines, _ = _numbered_lines(20)
    everything = shuffled_sentences(lines, seed=3, max_sentences=-1)
    assert len(everything) == 40
    assert shuffled_sentences(lines, seed=3, max_sentences=5) == everything[:5]
    assert shuffled_sentences(lines, seed=3, max_sentences=1000) == everything
    for bad in (0, -2):
        with pytest.raises(FflayersError, match="max_sentences"):
            shuffled_sentences(lines, seed=3, max_sentences=bad)


def test_shuffled_raw_text():
    lines = ["First one. Second one.", "Third one."]
    out = shuffled_sentences(lines, seed=0, max_sentences=-1, pretokenized=False)
    assert sorted(out) == ["First one.", "Second one.", "Third one."]
