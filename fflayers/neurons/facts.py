"""Fact files: PARAREL-like jsonl, one fact a line, several paraphrased prompts each.

``{"uuid": "capital-FRA", "relation": "capital", "prompts": ["The capital of France is", ...],
"answer": "Paris"}``

For causal LMs the answer follows each prompt; for masked LMs each prompt holds the mask token where the
answer goes. A fact may also carry ``"masked_prompts"``: the same paraphrases for masked LMs, each with
:data:`MASK_PLACEHOLDER` (``[MASK]``) once where the answer goes; ``read_facts(path, mask_token=...)`` then
uses those, the placeholder replaced by the model's mask token (facts without them keep ``prompts``).

:data:`RELATIONS_FILE` ships with the package: :func:`load_relations` reads its facts of several relations
(capitals, countries of cities, languages, continents, currencies, musicians' instruments, scientists' fields,
companies' countries, chemical symbols), so that unrelated facts can come from another relation.
:func:`countries_paraphrases` builds capital / country-of-capital facts offline from the countries list
(:func:`fflayers.data.countries.read_countries`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fflayers.core import InputError

FIELDS = ("uuid", "relation", "prompts", "answer")
#: Optional field: the prompts for masked LMs, each with :data:`MASK_PLACEHOLDER` once.
MASKED_FIELD = "masked_prompts"
#: Where the answer goes in ``masked_prompts``; replaced by the model's mask token when read.
MASK_PLACEHOLDER = "[MASK]"
#: Multi-relation paraphrase facts shipped with the package (causal and masked prompts).
RELATIONS_FILE = Path(__file__).resolve().parent.parent / "data" / "relations.jsonl"

#: Paraphrase templates per relation of the countries list; ``{}`` is the subject.
COUNTRY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {} is",
        "{}'s capital city is",
        "The capital city of {} is called",
        "The seat of the government of {} is in the city of",
        "The largest political center of {} is its capital,",
    ),
    "country_of_capital": (
        "{} is the capital of",
        "{} is the capital city of the country of",
        "The city of {} is the capital of",
        "{} serves as the capital of",
    ),
}


@dataclass(frozen=True)
class ParaphraseFact:
    """One paraphrase-set fact: an id, its relation, prompts that all express it, and the answer."""

    uuid: str
    relation: str
    prompts: tuple[str, ...]
    answer: str

    def to_json(self) -> dict:
        row = asdict(self)
        row["prompts"] = list(self.prompts)
        return row


def _prompt_list(row: Mapping, name: str, where: str) -> tuple[str, ...]:
    prompts = row[name]
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise InputError(f"{where}: '{name}' must be a non-empty list of strings")
    if not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InputError(f"{where}: every prompt of '{name}' must be a non-empty string")
    return tuple(prompts)


def fact_from_row(row: Mapping, where: str = "fact", mask_token: str | None = None) -> ParaphraseFact:
    """A :class:`ParaphraseFact` from a parsed jsonl row; one-line :class:`~fflayers.core.InputError` naming
    what is wrong.

    With ``mask_token`` (masked LMs) a row's ``masked_prompts`` are used as its prompts, with
    :data:`MASK_PLACEHOLDER` replaced by ``mask_token``; rows without them keep ``prompts``."""
    if not isinstance(row, Mapping):
        raise InputError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}; "
                         f"each fact needs {', '.join(FIELDS)}")
    prompts = _prompt_list(row, "prompts", where)
    for name in ("uuid", "relation", "answer"):
        value = row[name]
        if not isinstance(value, str | int) or not str(value).strip():
            raise InputError(f"{where}: '{name}' must be a non-empty string")
    if MASKED_FIELD in row:
        masked = _prompt_list(row, MASKED_FIELD, where)
        bad = [p for p in masked if p.count(MASK_PLACEHOLDER) != 1]
        if bad:
            raise InputError(f"{where}: masked prompt {bad[0]!r} must hold {MASK_PLACEHOLDER} exactly once, "
                             "where the answer goes")
        if mask_token is not None:
            prompts = tuple(p.replace(MASK_PLACEHOLDER, mask_token) for p in masked)
    return ParaphraseFact(str(row["uuid"]), str(row["relation"]), prompts, str(row["answer"]))


def read_facts(path: str | Path, mask_token: str | None = None) -> list[ParaphraseFact]:
    """Facts of a jsonl file, in file order (blank lines skipped); uuids must be unique. ``mask_token``
    (masked LMs): use the facts' ``masked_prompts`` where they have them (see :func:`fact_from_row`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"fact file {path} does not exist; pass a jsonl file of facts (uuid, relation, "
                         "prompts, answer)")
    facts: list[ParaphraseFact] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read fact file {path} ({err})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{n}: not valid JSON ({err.msg}); one JSON object per line") from None
        fact = fact_from_row(row, f"{path}:{n}", mask_token)
        if fact.uuid in seen:
            raise InputError(f"{path}:{n}: uuid {fact.uuid!r} appears twice; uuids must be unique")
        seen.add(fact.uuid)
        facts.append(fact)
    if not facts:
        raise InputError(f"fact file {path} holds no facts; one JSON object per line with "
                         f"{', '.join(FIELDS)}")
    return facts


def load_relations(relations: Iterable[str] | None = None, mask_token: str | None = None,
                   path: str | Path | None = None) -> list[ParaphraseFact]:
    """Facts of :data:`RELATIONS_FILE` (or ``path``), in file order: causal prompts, or with ``mask_token``
    the masked ones. ``relations`` keeps only these relations (an unknown name is an
    :class:`~fflayers.core.InputError` naming the file's relations)."""
    facts = read_facts(RELATIONS_FILE if path is None else path, mask_token)
    if relations is None:
        return facts
    wanted = set(relations)
    held = relation_names(facts)
    unknown = sorted(wanted - set(held))
    if unknown:
        raise InputError(f"unknown relation(s) {', '.join(unknown)}; the facts hold {', '.join(held)}")
    return [f for f in facts if f.relation in wanted]


def relation_names(facts: Iterable[ParaphraseFact]) -> list[str]:
    """The relations of ``facts``, in order of first appearance."""
    return list(dict.fromkeys(f.relation for f in facts))


def write_facts(path: str | Path, facts: Iterable[ParaphraseFact]) -> None:
    """Write facts as jsonl (atomically)."""
    from fflayers.io import write_jsonl

    write_jsonl(path, (f.to_json() for f in facts))


def _simple(name: str) -> bool:
    """Names usable as a subject or an answer: no parenthesised notes, no lists of alternatives."""
    return bool(name) and not any(c in name for c in "(),;/")


def countries_paraphrases(
    templates: Mapping[str, Sequence[str]] | None = None,
    countries_file: str | Path | None = None,
    limit: int | None = None,
    mask_token: str | None = None,
) -> list[ParaphraseFact]:
    """Facts of the countries list: per country ``capital`` (country -> capital) and ``country_of_capital``
    (capital -> country), each with every template of its relation as a prompt.

    ``templates`` maps relation names (keys of :data:`COUNTRY_TEMPLATES`) to ``{}`` templates; ``limit`` keeps
    the first countries; ``mask_token`` (masked LMs) appends ``" <mask>."`` to every prompt. Countries whose
    name or capital carries notes or alternatives (``"La Paz (seat of government), Sucre ..."``) are skipped.
    """
    from fflayers.data.countries import COUNTRIES_FILE, read_countries

    templates = COUNTRY_TEMPLATES if templates is None else templates
    unknown = sorted(set(templates) - set(COUNTRY_TEMPLATES))
    if unknown:
        raise InputError(f"unknown relation(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(COUNTRY_TEMPLATES)}")
    for relation, temps in templates.items():
        if not temps or any(t.count("{}") != 1 for t in temps):
            raise InputError(f"templates of {relation!r} must be a non-empty list, "
                             f"each with exactly one '{{}}'")
    countries = [c for c in read_countries(countries_file or COUNTRIES_FILE)
                 if _simple(c.name) and _simple(c.capital)]
    if limit is not None:
        countries = countries[: max(0, limit)]
    suffix = f" {mask_token}." if mask_token else ""
    facts = []
    for relation, temps in templates.items():
        for c in countries:
            subject, answer = (c.name, c.capital) if relation == "capital" else (c.capital, c.name)
            prompts = tuple(t.format(subject) + suffix for t in temps)
            facts.append(ParaphraseFact(f"{relation}-{c.alpha3}", relation, prompts, answer))
    return facts
