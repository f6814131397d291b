import gzip

import pytest

from fflayers.core import FflayersError
from fflayers.data.countries import COUNTRIES_FILE, read_countries


def test_planted_file(tmp_path):
    path = tmp_path / "c.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("# comment\n\n250:FR:FRA:France:Paris\n010:AQ:ATA:Antarctica:\n248:AX:ALA:Åland "
                "Islands:Mariehamn\n")
    rows = read_countries(path)
    assert [(c.name, c.capital, c.alpha3) for c in rows] == [("France", "Paris", "FRA"),
                                                             ("Åland Islands", "Mariehamn", "ALA")]


def test_bad_line_and_missing(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("250:FR:France:Paris\n")
    with pytest.raises(FflayersError, match="expected"):
        read_countries(path)
    with pytest.raises(FflayersError, match="not found"):
        read_countries(tmp_path / "none.gz")


def test_debian_list():
    rows = read_countries(COUNTRIES_FILE)
    pairs = {c.name: c.capital for c in rows}
    assert pairs["France"] == "Paris" and pairs["Japan"] == "Tokyo"
    assert len(rows) > 200 and all(c.capital for c in rows)
