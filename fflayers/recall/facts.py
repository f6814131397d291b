"""Fact sets (ROME's known_1000 JSON) and their encoding for a model: token ids, subject positions, attribute.

A known_1000 file is a JSON list of objects with ``known_id``, ``subject``, ``attribute`` and ``prompt`` (the
prompt contains the subject and ends where the attribute would follow); other fields (``template``,
``prediction``, ``relation_id``) are kept in :attr:`KnownFact.extra` and written back by :func:`save_facts`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fflayers.backends.base import LMAdapter
from fflayers.core import FflayersError, InputError
from fflayers.data.countries import COUNTRIES_FILE, read_countries

REQUIRED_FIELDS = ("known_id", "subject", "attribute", "prompt")


@dataclass
class KnownFact:
    """One known_1000 record: ``prompt`` contains ``subject``; the model should continue it with
    ``attribute``."""

    known_id: int | str
    subject: str
    attribute: str
    prompt: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The known_1000 record (the four fields first, then the extra ones)."""
        return {"known_id": self.known_id, "subject": self.subject, "attribute": self.attribute,
                "prompt": self.prompt, **self.extra}


def _fact_from_record(record: Any, index: int) -> KnownFact:
    if not isinstance(record, dict):
        raise InputError(f"fact #{index} is a {type(record).__name__}, not an object; "
                           "each entry needs known_id, subject, attribute and prompt")
    name = f"fact {record['known_id']!r}" if "known_id" in record else f"fact #{index}"
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise InputError(f"{name} has no field {', '.join(missing)}; add it (known_1000 format: "
                           f"{', '.join(REQUIRED_FIELDS)})")
    for key in ("subject", "attribute", "prompt"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise InputError(f"{name}: field {key!r} must be a non-empty string, got {record[key]!r}")
    if not isinstance(record["known_id"], (int, str)) or isinstance(record["known_id"], bool):
        raise InputError(f"{name}: known_id must be an integer or a string")
    extra = {k: v for k, v in record.items() if k not in REQUIRED_FIELDS}
    return KnownFact(record["known_id"], record["subject"], record["attribute"], record["prompt"], extra)


def load_facts(path: str | Path, skipped: list[str] | None = None) -> list[KnownFact]:
    """Facts of a known_1000 JSON file, in file order.

    A file that is missing, empty, not JSON or not a list is a one-line :class:`~fflayers.core.InputError`. A
    bad entry (not an object, a missing or empty field) raises too, naming the fact, unless ``skipped`` is
    given: then its message is appended there and the entry skipped. Duplicate ``known_id``\\ s are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"fact file {path} does not exist; pass a known_1000 JSON file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(f"fact file {path} is empty; it must hold a JSON list of facts")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"fact file {path} is not valid JSON (line {err.lineno}, column {err.colno}: "
                           f"{err.msg}); fix the file") from None
    if not isinstance(data, list):
        raise InputError(f"fact file {path} holds a JSON {type(data).__name__}; expected a list of facts")
    facts: list[KnownFact] = []
    seen: set = set()
    for i, record in enumerate(data):
        try:
            fact = _fact_from_record(record, i)
            if fact.known_id in seen:
                raise InputError(f"fact {fact.known_id!r} appears twice; known_id must be unique")
        except FflayersError as err:
            if skipped is None:
                raise InputError(f"{path}: {err}") from None
            skipped.append(str(err))
            continue
        seen.add(fact.known_id)
        facts.append(fact)
    return facts


def save_facts(facts: Sequence[KnownFact], path: str | Path) -> None:
    """Write facts as a known_1000 JSON list (atomically)."""
    from fflayers.io import atomic_write

    with atomic_write(path) as f:
        json.dump([fact.to_json() for fact in facts], f, indent=1, ensure_ascii=False)


def countries_facts(path: str | Path = COUNTRIES_FILE,
                    template: str = "The capital of {} is") -> list[KnownFact]:
    """One fact per country of the Debian countries list: subject = country, attribute = capital (verbatim),
    prompt = ``template.format(country)``; ``known_id`` counts from 0 in file order."""
    if template.count("{}") != 1:
        raise InputError(f"template {template!r} must contain exactly one '{{}}' for the subject")
    return [KnownFact(i, c.name, c.capital, template.format(c.name),
                      {"template": template, "relation_id": "capital"})
            for i, c in enumerate(read_countries(path))]


@dataclass
class EncodedFact:
    """A fact as one model reads it.

    ``ids``: the prompt's tokens exactly as the model reads them (fairseq keeps its leading ``</s>``; HF adds
    BOS only where its tokenizer does). ``subject_positions``: the tokens whose character span intersects the
    subject's first occurrence in the prompt (a leading-space token such as ``" France"`` counts).
    ``attribute_ids``: the tokens of ``" " + attribute`` as they follow the prompt (see :func:`encode_fact`);
    ``attribute_split`` says how they were found (``"joint"`` or ``"alone"``).
    """

    fact: KnownFact
    ids: list[int]
    subject_positions: list[int]
    attribute_ids: list[int]
    attribute_split: str = "joint"

    @property
    def attribute_id(self) -> int:
        """The attribute's first token: what the knockout and the filter score."""
        return self.attribute_ids[0]

    @property
    def last(self) -> int:
        """Index of the prompt's last token (where the attribute is predicted)."""
        return len(self.ids) - 1


def _name(fact: KnownFact) -> str:
    return f"fact {fact.known_id!r}"


def subject_span(fact: KnownFact) -> tuple[int, int]:
    """Character span of the subject's first occurrence in the prompt; :class:`~fflayers.core.InputError` if
    absent."""
    start = fact.prompt.find(fact.subject)
    if start < 0:
        raise InputError(f"{_name(fact)}: subject {fact.subject!r} is not in the prompt {fact.prompt!r}; "
                           "fix the subject or the prompt")
    return start, start + len(fact.subject)


def encode_fact(adapter: LMAdapter, fact: KnownFact) -> EncodedFact:
    """Token ids, subject positions and attribute tokens of one fact, or a one-line
    :class:`~fflayers.core.InputError`.

    Attribute tokens: ``tokenize(prompt + " " + attribute)`` minus the prompt's tokens where the prompt's
    tokens are an exact prefix of it (``attribute_split="joint"``: the tokens the model would really read
    next), else ``tokenize(" " + attribute)`` alone, without BOS (``"alone"``; e.g. when the tokenizer merges
    across the boundary or appends an end token).
    """
    if adapter.is_masked_lm:
        raise InputError("facts need a causal LM (the attribute is predicted after the prompt); "
                           f"this {adapter.family} model is a masked LM")
    s_start, s_end = subject_span(fact)
    ids, spans = adapter.vocab.tokenize_with_offsets(fact.prompt, add_bos=True)
    if not ids:
        raise InputError(f"{_name(fact)}: the prompt {fact.prompt!r} has no tokens")
    limit = adapter.max_positions
    if limit is not None and len(ids) > limit:
        raise InputError(f"{_name(fact)}: the prompt has {len(ids)} tokens, more than the model's {limit} "
                           "positions; shorten it")
    subject = [i for i, (a, b) in enumerate(spans) if b > a and a < s_end and b > s_start]
    if not subject:
        raise InputError(f"{_name(fact)}: no token of the prompt covers the subject {fact.subject!r}")
    attribute = fact.attribute.strip()
    joint = adapter.vocab.tokenize(f"{fact.prompt} {attribute}", add_bos=True)
    if len(joint) > len(ids) and joint[: len(ids)] == ids:
        attribute_ids, split = joint[len(ids):], "joint"
    else:
        attribute_ids, split = adapter.vocab.tokenize(f" {attribute}", add_bos=False), "alone"
    if not attribute_ids:
        raise InputError(f"{_name(fact)}: the attribute {fact.attribute!r} has no tokens")
    return EncodedFact(fact, list(ids), subject, list(attribute_ids), split)


def encode_facts(adapter: LMAdapter, facts: Sequence[KnownFact],
                 skip_bad: bool = True) -> tuple[list[EncodedFact], list[str]]:
    """Encode facts in order; with ``skip_bad`` a fact that cannot be encoded is left out and its one-line
    message returned in the second list, otherwise its :class:`~fflayers.core.InputError` is raised."""
    encoded: list[EncodedFact] = []
    skipped: list[str] = []
    for fact in facts:
        try:
            encoded.append(encode_fact(adapter, fact))
        except FflayersError as err:
            if not skip_bad:
                raise
            skipped.append(str(err))
    return encoded, skipped
