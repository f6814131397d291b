"""Trigger examples as readable text: one file per key, one line per trigger example.

File ``{dim}_{layer}.txt``; line ``fc1_value<TAB>prefix *target*``: ``prefix`` is the sentence up to and
including the token at the trigger position, ``target`` the token that position predicts (the next token of
the input, ``</s>`` after the last one). Example: ``3.14\tthe cat sat *on*``. A trigger at the BOS position
has an empty prefix: ``2.5\t*the*``. Tabs and newlines inside tokens are written as spaces.

Word-level models (fairseq: input ``</s> w1 .. wn``, ``text`` = the space-joined words) need no tokenizer:
position ``t`` has prefix ``w1 .. wt`` and target ``w(t+1)``, and the target word is its own dictionary entry.
Subword models re-tokenize ``text`` with their adapter, exactly as the sentences were tokenized for mining;
a subword target cannot be recovered exactly from its string (the leading space is stripped in the line, and
a piece can have several spellings), so the folder also holds :data:`TARGET_IDS_FILE`: one JSON line per key
file, ``{"file": "12_3.txt", "target_ids": [...]}``, the target token ids in the order of the file's lines.

A finished folder holds :data:`MARKER` (``textual.json``): the counts of files and lines, the input's SHA-256
and the digest of the vocabulary used (:func:`vocabulary_digest`). Readers refuse a folder without it or with
other counts (an interrupted conversion), and the agreement step one made with another vocabulary.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from fflayers.backends.vocabulary import Vocabulary
from fflayers.core import InputError

EOS = "</s>"
#: exact target token ids of subword models, beside the ``{dim}_{layer}.txt`` files
TARGET_IDS_FILE = "target_ids.jsonl"
#: the completion marker of a finished textual folder, and its format
MARKER = "textual.json"
MARKER_FORMAT = "fflayers-textual/1"
_FILE = re.compile(r"^(\d+)_(\d+)\.txt$")
_WS = re.compile(r"[\t\r\n]")


class WordLevel:
    """Word-level input ``</s> w1 .. wn`` (fairseq LMs): position t predicts word t+1 (1-based)."""

    def prefix_and_target(self, text: str, position: int) -> tuple[str, str]:
        words = text.split()
        if not 0 <= position <= len(words):
            raise InputError(
                f"token_indice {position} is out of range for a {len(words)}-word sentence; "
                "was the file made with a word-level (fairseq) model?"
            )
        target = words[position] if position < len(words) else EOS
        return " ".join(words[:position]), target

    def target_id(self, text: str, position: int) -> int | None:
        """None: word-level targets are looked up by their string, which is exact."""
        return None


class SubwordTokens:
    """Subword models: ``text`` is re-tokenized with ``vocab.tokenize(text)`` (BOS added as for mining);
    ``vocab`` is the model's :class:`~fflayers.backends.vocabulary.Vocabulary` (``adapter.vocab``)."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self._ids = lru_cache(maxsize=4096)(lambda text: tuple(vocab.tokenize(text)))

    def prefix_and_target(self, text: str, position: int) -> tuple[str, str]:
        ids = self._ids(text)
        if not 0 <= position < len(ids):
            raise InputError(
                f"token_indice {position} is out of range for a {len(ids)}-token input; "
                "was the file made with this model and tokenizer?"
            )
        bos = self.vocab.bos_id
        start = 1 if bos is not None and ids and ids[0] == bos else 0
        prefix = self.vocab.detokenize(list(ids[start : position + 1])).strip() if position >= start else ""
        target = self.vocab.id_to_token([ids[position + 1]])[0].strip() if position + 1 < len(ids) else EOS
        return prefix, target

    def target_id(self, text: str, position: int) -> int:
        """The id of the token after ``position`` in the tokenized ``text`` (after the last one: the
        tokenizer's EOS id, or -1 when it has none)."""
        ids = self._ids(text)
        if position + 1 < len(ids):
            return int(ids[position + 1])
        eos = getattr(self.vocab, "eos_id", None)
        return int(eos) if isinstance(eos, int) else -1


def format_line(value: float, prefix: str, target: str) -> str:
    """``value<TAB>prefix *target*`` (no space before ``*`` when the prefix is empty), no newline."""
    prefix, target = _WS.sub(" ", prefix), _WS.sub(" ", target)
    star = f"*{target}*"
    return f"{value}\t{prefix} {star}" if prefix else f"{value}\t{star}"


def parse_line(line: str) -> tuple[float, str, str]:
    """Inverse of :func:`format_line`: ``(value, prefix, target)``."""
    line = line.rstrip("\n")
    value, sep, rest = line.partition("\t")
    if not sep or len(rest) < 2 or not rest.endswith("*"):
        raise InputError(f"malformed trigger-example line {line!r}; expected 'value<TAB>prefix *target*'")
    cut = rest.rfind(" *", 0, len(rest) - 1)
    if cut >= 0:
        prefix, target = rest[:cut], rest[cut + 2 : -1]
    elif rest.startswith("*"):
        prefix, target = "", rest[1:-1]
    else:
        raise InputError(f"malformed trigger-example line {line!r}; expected 'value<TAB>prefix *target*'")
    try:
        return float(value), prefix, target
    except ValueError:
        raise InputError(f"malformed trigger-example line {line!r}: {value!r} is not a number; expected "
                         "'value<TAB>prefix *target*'") from None


def _json_lines(path: Path, what: str) -> Iterator[tuple[int, object]]:
    """``(line number, decoded value)`` of each non-blank line of a JSON-lines file; one-line error naming
    ``what`` the file should be when a line is not JSON."""
    lineno = 0
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path} line {lineno} is not JSON ({e.msg}); {what}") from None
        except UnicodeDecodeError:
            raise InputError(f"{path} is not UTF-8 text (undecodable bytes after line {lineno}); it is not a "
                             f"JSON-lines file: {what}") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Rows of a trigger-examples JSONL file (original schema)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"input file {p} does not exist; pass the .jsonl written by generate_outputs.py")
    for lineno, row in _json_lines(p, "pass a trigger-examples .jsonl file"):
        if not isinstance(row, dict) or "dim" not in row or "top_values" not in row:
            raise InputError(
                f"{p} line {lineno} lacks 'dim'/'top_values'; pass a trigger-examples .jsonl file")
        yield row


def textual_files(rows: Iterable[dict], tokens) -> Iterator[tuple[str, list[str], list[int] | None]]:
    """``(file name, lines, target ids)`` per key, streaming over ``rows``; ``tokens`` is a :class:`WordLevel`
    (target ids None) or :class:`SubwordTokens`.

    The layer of a key is its records' ``layer_index``; a key without records takes the layer seen at the
    same place of ``top_values`` in other rows (or that place's index), and its (empty) file comes last.
    """
    slot_layers: dict[int, int] = {}
    empty: list[tuple[int, int]] = []
    for n, row in enumerate(rows, 1):
        dim = int(row["dim"])
        for j, records in enumerate(row["top_values"]):
            if not records:
                empty.append((dim, j))
                continue
            try:
                layer = int(records[0]["layer_index"])
                lines, ids = [], []
                for rec in records:
                    text, position = rec["text"], int(rec["token_indice"])
                    prefix, target = tokens.prefix_and_target(text, position)
                    lines.append(format_line(rec["fc1_value"], prefix, target))
                    ids.append(tokens.target_id(text, position))
            except (KeyError, TypeError, ValueError) as err:
                raise InputError(f"record {n} (dim {dim}) has a malformed trigger example "
                                 f"({type(err).__name__}: {err}); each needs layer_index, token_indice, "
                                 "fc1_value and text: pass the output of generate_outputs.py "
                                 "--get_trigger_examples") from None
            slot_layers.setdefault(j, layer)
            yield f"{dim}_{layer}.txt", lines, None if None in ids else ids
    for dim, j in empty:
        yield f"{dim}_{slot_layers.get(j, j)}.txt", [], None


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty folder unless ``overwrite``; create it when missing."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output folder {out} is not empty; pass --overwrite or choose another folder")
    if not out.exists() and not out.parent.is_dir():
        raise InputError(f"folder {out.parent} does not exist; create it or choose another output folder")
    from fflayers.io import check_folder_writable

    check_folder_writable(out if out.exists() else out.parent)
    return out


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``: one rename when ``out`` is missing or empty; otherwise
    (``overwrite``) the old marker goes first, then the old key files, then the new files, the marker last."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(tmp, out)
        return
    (out / MARKER).unlink(missing_ok=True)
    for old in out.iterdir():
        if (_FILE.match(old.name) or old.name == TARGET_IDS_FILE) and old.is_file():
            old.unlink()
    for new in sorted(tmp.iterdir(), key=lambda f: f.name == MARKER):
        os.replace(new, out / new.name)
    tmp.rmdir()


def write_textual(input_file: str | os.PathLike, output_dir: str | os.PathLike, tokens,
                  overwrite: bool = False,
                  progress: bool = True, vocabulary: Vocabulary | None = None) -> int:
    """Convert a trigger-examples JSONL file to one text file per key; returns the number of files.

    The files are written into a temporary folder beside ``output_dir`` and moved there once all of them
    (and :data:`MARKER`, with their counts and the ``vocabulary`` digest) are written: a malformed input line
    or a killed run leaves ``output_dir`` as it was. With ``overwrite`` the folder's old key files are
    replaced (other files stay).
    """
    import shutil

    from tqdm.auto import tqdm

    from fflayers.io import write_jsonl
    from fflayers.runs import file_digest

    out = check_output_dir(output_dir, overwrite)
    if next(read_jsonl(input_file), None) is None:
        raise InputError(f"input file {input_file} holds no trigger examples; pass a non-empty .jsonl")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed conversion
    tmp.mkdir()
    try:
        n = n_lines = 0
        stored: list[dict] = []
        for name, lines, ids in tqdm(textual_files(read_jsonl(input_file), tokens), disable=not progress,
                                     unit="file", desc="textual"):
            (tmp / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            if ids is not None:
                stored.append({"file": name, "target_ids": ids})
            n, n_lines = n + 1, n_lines + len(lines)
        if stored:
            write_jsonl(tmp / TARGET_IDS_FILE, stored)
        write_marker(tmp, vocabulary, file_digest(input_file), counts=(n, n_lines))
        _commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return n


def write_marker(directory: str | os.PathLike, vocabulary: Vocabulary | None = None,
                 input_sha256: str | None = None, counts: tuple[int, int] | None = None) -> dict:
    """Mark ``directory`` as a finished textual folder (:data:`MARKER`) and return the marker: for a folder
    made by other means (the original code, by hand) whose files are known to be complete. ``vocabulary``:
    the one its lines were made with (checked by the agreement step); ``counts``: ``(files, lines)`` when
    known, else counted."""
    d = Path(directory)
    if counts is None:
        files = [f for f in d.iterdir() if _FILE.match(f.name) and f.is_file()]
        lines = sum(1 for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
        counts = (len(files), lines)
    marker = {"format": MARKER_FORMAT, "files": counts[0], "lines": counts[1],
              "target_ids": (d / TARGET_IDS_FILE).is_file(), "input_sha256": input_sha256,
              "vocabulary": None if vocabulary is None else vocabulary_digest(vocabulary)}
    tmp = d / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, d / MARKER)
    return marker


def vocabulary_digest(vocabulary: Vocabulary, size: int | None = None) -> dict:
    """``{"size", "sha256"}`` of the first ``size`` (default all) token strings of ``vocabulary``."""
    import hashlib

    size = vocabulary.size if size is None else size
    tokens = vocabulary.id_to_token(list(range(min(size, vocabulary.size))))
    return {"size": size, "sha256": hashlib.sha256("\n".join(tokens).encode("utf-8", "replace")).hexdigest()}


def read_marker(directory: str | os.PathLike) -> dict:
    """The completion marker of a textual folder; refuses a folder without one (left by an interrupted or
    older conversion) or whose key files are not those the marker counts."""
    d = Path(directory)
    path = d / MARKER
    rerun = "rerun trigger_examples_jsonl_to_textual.py (with --overwrite) to make the folder again"
    if not path.is_file():
        raise InputError(f"folder {d} has no {MARKER}: it was left by an interrupted conversion or made "
                         f"elsewhere; {rerun} (a complete folder from elsewhere: "
                         "fflayers.memories.textual.write_marker)")
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        files = int(marker["files"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InputError(f"{path} is malformed; {rerun}") from None
    if marker.get("format") != MARKER_FORMAT:
        raise InputError(f"{path} has format {marker.get('format')!r}, this version reads {MARKER_FORMAT}; "
                         f"{rerun}")
    found = sum(1 for f in d.iterdir() if _FILE.match(f.name) and f.is_file())
    if found != files:
        raise InputError(f"folder {d} holds {found} key files, its {MARKER} says {files}; {rerun}")
    if marker.get("target_ids") and not (d / TARGET_IDS_FILE).is_file():
        raise InputError(f"folder {d} lacks its {TARGET_IDS_FILE}; {rerun}")
    return marker


def check_vocabulary(directory: str | os.PathLike, vocabulary: Vocabulary) -> None:
    """Refuse a textual folder made with another vocabulary than ``vocabulary``'s (the model's)."""
    want = read_marker(directory).get("vocabulary")
    if want is None:
        return
    got = vocabulary_digest(vocabulary, int(want["size"]))
    if vocabulary.size < int(want["size"]) or got["sha256"] != want["sha256"]:
        raise InputError(f"folder {directory} was made with another vocabulary ({want['size']} tokens) than "
                         f"this model's ({vocabulary.size} tokens); convert the trigger examples with this "
                         "model's --model_dir / --hf_model")


def read_textual_dir(directory: str | os.PathLike) -> dict[tuple[int, int], list[tuple[float, str, str]]]:
    """``{(layer, dim): [(value, prefix, target), ...]}`` from a folder written by :func:`write_textual`."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"folder {d} does not exist; pass the output folder of "
                         "trigger_examples_jsonl_to_textual.py")
    read_marker(d)
    out: dict[tuple[int, int], list[tuple[float, str, str]]] = {}
    for path in sorted(d.iterdir()):
        m = _FILE.match(path.name)
        if not m or not path.is_file():
            continue
        dim, layer = int(m.group(1)), int(m.group(2))
        rows, lineno = [], 0
        rerun = "rerun trigger_examples_jsonl_to_textual.py"
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):  # noqa: B007 - lineno names the bad line
                    if line.strip():
                        rows.append(parse_line(line))
        except InputError as err:
            raise InputError(f"{path} line {lineno}: {err}; {rerun}") from None
        except UnicodeDecodeError:
            raise InputError(f"{path} is not UTF-8 text; {rerun}") from None
        out[layer, dim] = rows
    if not out:
        raise InputError(f"folder {d} holds no {{dim}}_{{layer}}.txt files; "
                         "run trigger_examples_jsonl_to_textual.py first")
    return out


def textual_digest(directory: str | os.PathLike) -> str:
    """SHA-256 of a textual folder's content: the name and content digest of each ``{dim}_{layer}.txt`` file
    and of :data:`TARGET_IDS_FILE`, in name order (neither the folder's own path nor other files count)."""
    import hashlib

    from fflayers.runs import file_digest

    h = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and (_FILE.match(path.name) or path.name == TARGET_IDS_FILE):
            h.update(f"{path.name}\t{file_digest(path)}\n".encode())
    return h.hexdigest()


def read_target_ids(directory: str | os.PathLike) -> dict[tuple[int, int], list[int]] | None:
    """``{(layer, dim): [target id per line]}`` from the folder's :data:`TARGET_IDS_FILE`, or None when it has
    none (word-level models, or folders written before it existed)."""
    path = Path(directory) / TARGET_IDS_FILE
    if not path.is_file():
        return None
    out: dict[tuple[int, int], list[int]] = {}
    malformed = "rerun trigger_examples_jsonl_to_textual.py"
    for lineno, row in _json_lines(path, malformed):
        try:
            m = _FILE.match(row["file"])
            ids = [int(t) for t in row["target_ids"]]
        except (KeyError, TypeError, ValueError):
            m = None
        if not m:
            raise InputError(f"{path} line {lineno} is malformed; {malformed}")
        out[int(m.group(2)), int(m.group(1))] = ids
    return out
