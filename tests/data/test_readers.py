import json

import pytest

from fflayers.core import FflayersError
from fflayers.data.readers import (
    detect_format,
    is_wikitext_heading,
    read_corpus,
    read_jsonl_texts,
    read_text_lines,
    read_wikitext_lines,
)

WIKITEXT = (
    " \n"
    " = Robert Boulter = \n"
    " \n"
    " Robert Boulter is an English film , television and theatre actor . \n"
    " He had a guest @-@ starring role on the television series The Bill in 2000 . \n"
    " \n"
    " = = Career = = \n"
    " \n"
    " = = = 2000 – 2005 = = = \n"
    " \n"
    " In 2006 , Boulter starred in the play Herons ; it cost 1 @,@ 000 <unk> . \n"
    " \n"
)
WIKITEXT_LINES = [
    "Robert Boulter is an English film , television and theatre actor .",
    "He had a guest @-@ starring role on the television series The Bill in 2000 .",
    "In 2006 , Boulter starred in the play Herons ; it cost 1 @,@ 000 <unk> .",
]


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ----- formats ------------------------------------------------------------------------------------------


def test_wikitext_drops_headings_and_blanks_and_keeps_tokens(tmp_path):
    p = write(tmp_path / "wiki.train.tokens", WIKITEXT)
    assert read_wikitext_lines(p) == WIKITEXT_LINES


def test_wikitext_max_lines(tmp_path):
    p = write(tmp_path / "wiki.train.tokens", WIKITEXT)
    assert read_wikitext_lines(p, max_lines=2) == WIKITEXT_LINES[:2]
    assert read_wikitext_lines(p, max_lines=-1) == WIKITEXT_LINES
    with pytest.raises(FflayersError):
        read_wikitext_lines(p, max_lines=0)


@pytest.mark.parametrize(
    "line, expected",
    [
        (" = Robert Boulter = ", True),
        (" = = Career = = ", True),
        (" = = = 2000 – 2005 = = = ", True),
        ("x = y + 1", False),
        ("= not closed", False),
        ("The score was 2 = 2 .", False),
    ],
)
def test_heading_detection(line, expected):
    assert is_wikitext_heading(line) is expected


def test_text_lines_strip_and_skip_blank_and_bom(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("\ufeffFirst line.  \n\n   \n  Zweite Zeile: Grüße.\n last".encode())
    assert read_text_lines(p) == ["First line.", "Zweite Zeile: Grüße.", "last"]
    assert read_text_lines(p, max_lines=1) == ["First line."]


def test_jsonl_texts(tmp_path):
    rows = [
        {"text": " a b ", "id": 1},
        {"text": "c", "id": 2},
        {"text": "   ", "id": 3},
        {"text": "é", "id": 4},
    ]
    p = write(
        tmp_path / "a.jsonl",
        "\n".join(json.dumps(r) for r in rows[:2])
        + "\n\n"
        + "\n".join(json.dumps(r) for r in rows[2:])
        + "\n",
    )
    assert read_jsonl_texts(p) == ["a b", "c", "é"]
    q = write(tmp_path / "b.jsonl", json.dumps({"prompt": "p1"}) + "\n" + json.dumps({"prompt": "p2"}) + "\n")
    assert read_jsonl_texts(q, field="prompt") == ["p1", "p2"]


def test_read_corpus_dispatches_by_extension(tmp_path):
    tokens = write(tmp_path / "wiki.valid.tokens", WIKITEXT)
    plain = write(tmp_path / "wiki.valid.txt", WIKITEXT)
    jsonl = write(tmp_path / "c.jsonl", json.dumps({"text": "hello world"}) + "\n")
    assert (
        detect_format(tokens) == "wikitext"
        and detect_format(jsonl) == "jsonl"
        and detect_format(plain) == "text"
    )
    assert read_corpus(tokens) == WIKITEXT_LINES
    # as plain text the headings are ordinary lines
    assert read_corpus(plain) == [line.strip() for line in WIKITEXT.splitlines() if line.strip()]
    assert read_corpus(jsonl) == ["hello world"]
    # an explicit format overrides the extension
    assert read_corpus(plain, fmt="wikitext") == WIKITEXT_LINES
    with pytest.raises(FflayersError, match="unknown corpus format"):
        read_corpus(plain, fmt="csv")


# ----- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", [read_wikitext_lines, read_text_lines, read_jsonl_texts, read_corpus])
def test_missing_file(tmp_path, reader):
    with pytest.raises(FflayersError) as err:
        reader(tmp_path / "nope.tokens")
    msg = one_line(err)
    assert "nope.tokens" in msg and "does not exist" in msg


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(FflayersError, match="not a file"):
        read_text_lines(tmp_path)


@pytest.mark.parametrize(
    "reader, content",
    [
        (read_wikitext_lines, " \n = Title = \n \n = = Section = = \n\n"),
        (read_text_lines, "\n  \n\t\n"),
        (read_jsonl_texts, '{"text": "  "}\n\n'),
        (read_text_lines, ""),
    ],
)
def test_empty_corpus(tmp_path, reader, content):
    p = write(tmp_path / "empty.x", content)
    with pytest.raises(FflayersError) as err:
        reader(p)
    assert "no usable line" in one_line(err)


@pytest.mark.parametrize("reader", [read_wikitext_lines, read_text_lines, read_jsonl_texts])
def test_undecodable_bytes_name_offset_line_and_fix(tmp_path, reader):
    p = tmp_path / "latin1.txt"
    first = b'{"text": "good line"}\n'
    p.write_bytes(first + '{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(FflayersError) as err:
        reader(p)
    msg = one_line(err)
    offset = len(first) + len('{"text": "caf')  # where the latin-1 é (0xe9) sits
    assert "not UTF-8" in msg
    assert f"byte offset {offset}" in msg and "line 2" in msg and "0xe9" in msg
    assert "iconv" in msg


def test_jsonl_bad_json_names_line(tmp_path):
    p = write(tmp_path / "a.jsonl", '{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(FflayersError) as err:
        read_jsonl_texts(p)
    msg = one_line(err)
    assert "line 3" in msg and "not valid JSON" in msg


@pytest.mark.parametrize(
    "bad, what",
    [('{"body": "x"}', "no 'text' field"), ('["text"]', "no 'text' field"), ('{"text": 5}', "not a string")],
)
def test_jsonl_missing_or_bad_field_names_line(tmp_path, bad, what):
    p = write(tmp_path / "a.jsonl", '{"text": "ok"}\n' + bad + "\n")
    with pytest.raises(FflayersError) as err:
        read_jsonl_texts(p)
    msg = one_line(err)
    assert "line 2" in msg and what in msg
