import importlib.util
import sys
from pathlib import Path

import pytest

from fflayers.core import FflayersError
from fflayers.data.readers import is_wikitext_heading, read_wikitext_lines

pytest.importorskip("gensim")
pytest.importorskip("sacremoses")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "demo" / "build_corpus.py"


@pytest.fixture(scope="module")
def build_corpus_module():
    spec = importlib.util.spec_from_file_location("build_corpus_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def corpus(build_corpus_module, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, build_corpus_module.build_corpus(out, max_articles=10)


def test_files_layout_and_split(corpus):
    out, result = corpus
    assert sorted(p.name for p in out.iterdir()) == [
        "wiki.test.tokens",
        "wiki.train.tokens",
        "wiki.valid.tokens",
    ]
    assert {k: v["articles"] for k, v in result.items()} == {"train": 8, "valid": 1, "test": 1}
    for stats in result.values():
        lines = Path(stats["path"]).read_text(encoding="utf-8").split("\n")
        assert lines[-1] == ""  # file ends with a newline
        lines = lines[:-1]
        assert all(line.startswith(" ") for line in lines)  # WikiText: every line starts with a space
        titles = [line for line in lines if line.startswith(" = ") and not line.startswith(" = = ")]
        assert len(titles) == stats["articles"] and all(t.endswith(" = ") for t in titles)
        for i, line in enumerate(lines):  # headings sit between blank lines
            if is_wikitext_heading(line):
                assert lines[i - 1] == " " and lines[i + 1] == " "
        assert "  " not in "\n".join(line.strip() for line in lines)


def test_first_article_of_the_dump_is_anarchism(corpus):
    _, result = corpus
    text = Path(result["train"]["path"]).read_text(encoding="utf-8")
    assert text.startswith(" \n = Anarchism = \n \n Anarchism is a political philosophy")
    assert " = = History = = " in text


def test_wikitext_tokenization(corpus):
    _, result = corpus
    lines = read_wikitext_lines(result["train"]["path"])
    text = "\n".join(lines)
    assert " @-@ " in text and "self @-@ governed" in text
    assert " @,@ " in text or " @.@ " in text
    assert "'''" not in text and "[[" not in text and "{{" not in text
    tokens = text.split()
    assert "," in tokens and "." in tokens  # punctuation split off
    assert not any(t.endswith(",") and len(t) > 1 for t in tokens)


def test_stats_match_an_independent_reader(corpus):
    _, result = corpus
    assert result["train"]["tokens"] > 10_000
    for stats in result.values():
        lines = read_wikitext_lines(stats["path"])
        assert stats["lines"] == len(lines) > 0
        assert stats["tokens"] == sum(len(line.split()) for line in lines)


def test_cli_and_errors(build_corpus_module, tmp_path, capsys):
    result = build_corpus_module.main(["--out_dir", str(tmp_path / "cli"), "--max_articles", "3"])
    printed = capsys.readouterr().out.strip()
    assert "\n" not in printed and "train: 1 articles" in printed and "test: 1 articles" in printed
    assert all(Path(s["path"]).exists() for s in result.values())
    assert not [p for p in (tmp_path / "cli").iterdir() if p.suffix == ".tmp"]
    with pytest.raises(FflayersError, match="max_articles"):
        build_corpus_module.build_corpus(tmp_path / "x", max_articles=2)
    with pytest.raises(FflayersError, match="does not exist"):
        build_corpus_module.build_corpus(tmp_path / "x", source=tmp_path / "missing.xml.bz2")
