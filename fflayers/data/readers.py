"""Corpus readers: WikiText token files, plain text, JSON lines.

Every reader streams the file, returns a list of stripped, non-empty texts, and raises
:class:`~fflayers.core.InputError` with a one-line message (problem and fix) when the file is
missing, holds no usable line, is not UTF-8, or (JSON lines) has a malformed record.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from fflayers.core import InputError

#: WikiText heading lines: `` = Title = ``, `` = = Section = = `` (stripped).
_HEADING = re.compile(r"^(?:= )+.*?(?: =)+$|^=+$")

FORMATS: tuple[str, ...] = ("auto", "wikitext", "text", "jsonl")


def _check_max_lines(max_lines: int | None) -> int | None:
    if max_lines is None or max_lines < 0:
        return None
    if max_lines == 0:
        raise InputError("max_lines=0 reads nothing; pass a positive number, or None / -1 for all lines")
    return max_lines


def _decoded_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` of a UTF-8 file, with a clear error on undecodable bytes."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"corpus file {str(p)!r} does not exist; check the path (--data_file)")
    if not p.is_file():
        raise InputError(f"corpus path {str(p)!r} is not a file; pass the path of a text file")
    offset = 0
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(
                    f"{str(p)!r} is not UTF-8: undecodable byte 0x{raw[e.start]:02x} at byte offset "
                    f"{offset + e.start} (line {lineno}); re-encode it, e.g. "
                    f"`iconv -f LATIN1 -t UTF-8 in.txt > out.txt`"
                ) from None
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            offset += len(raw)
            yield lineno, text


def _empty_error(path: str | os.PathLike, what: str) -> InputError:
    return InputError(f"corpus file {str(path)!r} holds no usable line ({what}); pass a non-empty corpus")


def is_wikitext_heading(line: str) -> bool:
    """True for WikiText heading lines such as `` = Title = `` or `` = = Section = = ``."""
    return bool(_HEADING.match(line.strip()))


def _stripped_lines(path: str | os.PathLike, max_lines: int | None, skip, what: str) -> list[str]:
    """Stripped non-empty lines for which ``skip(line)`` is false, at most ``max_lines``; an error if none."""
    limit = _check_max_lines(max_lines)
    out: list[str] = []
    for _, text in _decoded_lines(path):
        line = text.strip()
        if not line or skip(line):
            continue
        out.append(line)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise _empty_error(path, what)
    return out


def read_wikitext_lines(path: str | os.PathLike, max_lines: int | None = None) -> list[str]:
    """Paragraph lines of a WikiText token file (e.g. ``wiki.train.tokens``), stripped.

    Blank lines and heading lines are dropped; tokens (``@-@`` escapes, ``<unk>``) are kept as they are.
    ``max_lines`` (None or -1 = all) stops after that many returned lines.
    """
    return _stripped_lines(path, max_lines, is_wikitext_heading, "only blank or heading lines")


def read_text_lines(path: str | os.PathLike, max_lines: int | None = None) -> list[str]:
    """Non-empty lines of a plain UTF-8 text file, stripped."""
    return _stripped_lines(path, max_lines, lambda line: False, "only blank lines")


def read_jsonl_texts(path: str | os.PathLike, field: str = "text", max_lines: int | None = None) -> list[str]:
    """The ``field`` of each JSON object of a JSON-lines file, stripped; blank lines, empty texts skipped."""
    limit = _check_max_lines(max_lines)
    out: list[str] = []
    for lineno, text in _decoded_lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{str(path)!r} line {lineno} is not valid JSON ({e.msg}); write one JSON object per line"
            ) from None
        if not isinstance(record, dict) or field not in record:
            raise InputError(
                f"{str(path)!r} line {lineno} has no {field!r} field; add it, or pass the right field name "
                f"(field=...)"
            )
        value = record[field]
        if not isinstance(value, str):
            raise InputError(
                f"{str(path)!r} line {lineno}: field {field!r} is {type(value).__name__}, not a string; "
                "store the text as a JSON string"
            )
        value = value.strip()
        if value:
            out.append(value)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise _empty_error(path, f"no non-empty {field!r} text")
    return out


def detect_format(path: str | os.PathLike) -> str:
    """``"wikitext"`` for ``.tokens`` files, ``"jsonl"`` for ``.jsonl``, else ``"text"``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".tokens":
        return "wikitext"
    if suffix == ".jsonl":
        return "jsonl"
    return "text"


def read_corpus(
    path: str | os.PathLike, fmt: str = "auto", field: str = "text", max_lines: int | None = None
) -> list[str]:
    """Read a corpus in format ``fmt`` (``auto`` picks by extension, see :func:`detect_format`)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown corpus format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "wikitext":
        return read_wikitext_lines(path, max_lines=max_lines)
    if fmt == "jsonl":
        return read_jsonl_texts(path, field=field, max_lines=max_lines)
    return read_text_lines(path, max_lines=max_lines)
