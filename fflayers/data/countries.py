"""Country -> capital pairs from Debian miscfiles' countries list (an offline source of factual prompts)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

from fflayers.core import InputError

#: Where Debian's ``miscfiles`` package installs the list (``apt-get install miscfiles``).
COUNTRIES_FILE = Path("/usr/share/misc/countries.gz")


@dataclass(frozen=True)
class Country:
    """One line of the list: ``code:a2:a3:country:capital``."""

    code: str
    alpha2: str
    alpha3: str
    name: str
    capital: str


def read_countries(path: str | Path = COUNTRIES_FILE) -> list[Country]:
    """Countries with a capital, in file order; comments, empty lines and empty capitals are skipped.

    ``path`` may be gzip-compressed (``.gz``) or plain text.
    """
    path = Path(path)
    if not path.is_file():
        hint = " (install Debian's miscfiles: apt-get install miscfiles)" if path == COUNTRIES_FILE else ""
        raise InputError(f"countries list {path} not found{hint}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read countries list {path}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) != 5:
            raise InputError(f"{path}:{n}: expected 'code:a2:a3:country:capital', got {line!r}")
        code, a2, a3, name, capital = (x.strip() for x in fields)
        if name and capital:
            out.append(Country(code, a2, a3, name, capital))
    if not out:
        raise InputError(f"countries list {path} has no country with a capital")
    return out
