"""WikiText token text back to ordinary text: each marker, on hand-written lines with known answers."""

from __future__ import annotations

import pytest

from fflayers.data import detokenize_wikitext

CASES = [
    ("hyphen joiner", "a state @-@ of @-@ the @-@ art design", "a state-of-the-art design"),
    ("thousands separator", "about 1 @,@ 000 @,@ 000 people", "about 1,000,000 people"),
    ("decimal point", "pi is 3 @.@ 14159 .", "pi is 3.14159."),
    ("punctuation", "Yes , it works ; really : no ! why ? done .", "Yes, it works; really: no! why? done."),
    ("possessive", "John 's book and the city 's walls", "John's book and the city's walls"),
    ("contractions", "they do n't know , I 'm sure they 're right",
     "they don't know, I'm sure they're right"),
    ("brackets", "the river ( 45 km ) flows [ north ]", "the river (45 km) flows [north]"),
    ("quotes", 'he said " hello there " and left', 'he said "hello there" and left'),
    ("quote at start", '" Hey " , she said', '"Hey", she said'),
    ("percent and dollar", "a rise of 5 % cost $ 20", "a rise of 5% cost $20"),
    ("unknown token kept", "the <unk> of the <unk> , then", "the <unk> of the <unk>, then"),
    ("untouched plain text", "Plain text stays as it is", "Plain text stays as it is"),
    ("empty", "", ""),
]


@pytest.mark.parametrize("name,tokens,expected", CASES, ids=[c[0] for c in CASES])
def test_markers(name, tokens, expected):
    assert detokenize_wikitext(tokens) == expected


def test_real_wikitext_line():
    line = (" The Tower Building of the Little Rock Arsenal , also known as U.S. Arsenal Building , "
            "is a building located in MacArthur Park in downtown Little Rock , Arkansas . Built in 1840 , "
            "it was part of Little Rock 's first military installation . The building has a 2 @,@ 500 @-@ "
            "square @-@ foot ( 230 m2 ) floor . ")
    assert detokenize_wikitext(line) == (
        "The Tower Building of the Little Rock Arsenal, also known as U.S. Arsenal Building, "
        "is a building located in MacArthur Park in downtown Little Rock, Arkansas. Built in 1840, "
        "it was part of Little Rock's first military installation. The building has a 2,500-square-foot "
        "(230 m2) floor.")
