"""Build a small WikiText-103-style corpus offline, from the Wikipedia sample shipped in the gensim wheel.

The gensim wheel carries ~100 real English Wikipedia articles
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``).
This script turns them into ``wiki.train.tokens``, ``wiki.valid.tokens`` and ``wiki.test.tokens`` laid out
like WikiText-103: `` = Title = `` and `` = = Section = = `` heading lines between blank lines, one paragraph
per line, every line starting with a space, text tokenized with the Moses tokenizer and WikiText's
escapes (``self @-@ governed``, ``1 @,@ 000``, ``3 @.@ 5``). Unlike WikiText, rare words are not replaced by
``<unk>`` (``fairseq-preprocess --thresholdsrc`` does that at vocabulary time).

The split is by article, in dump order: the last ``n_held`` articles are the test set, the ``n_held``
before them the validation set (``n_held = max(1, min(5, n // 10))``), the rest the training set.

Usage: ``python examples/demo/build_corpus.py --out_dir data/demo-wiki [--max_articles N]``
"""

from __future__ import annotations

import argparse
import bz2
import importlib.util
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fflayers.core import FflayersError, InputError
from fflayers.io import atomic_write

SAMPLE_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: Sections holding references and link lists rather than prose; skipped with everything under them.
SKIP_SECTIONS = frozenset(
    {
        "references",
        "external links",
        "see also",
        "further reading",
        "notes",
        "bibliography",
        "sources",
        "citations",
        "footnotes",
        "notes and references",
        "works cited",
        "general references",
    }
)
MIN_ARTICLE_TOKENS = 200  # articles with fewer paragraph tokens (stubs, disambiguation pages) are skipped
MIN_PARAGRAPH_WORDS = 8  # shorter lines are captions or list debris

_HEADING = re.compile(r"^(={2,6})\s*(.+?)\s*\1\s*$")
_PROSE_END = re.compile(r"[.!?][\"')\]]*$")
_NUMBER_SEP = re.compile(r"(?<=\d)([,.])(?=\d)")
_MEDIA = re.compile(r"(?i)^(?:file|image)\s*:|\|\s*alt\s*=|\.(?:png|jpe?g|svg|gif|tiff?)\b")


@dataclass
class Article:
    title: str
    blocks: list[tuple[int, str]] = field(default_factory=list)  # (heading level, text); level 0 = paragraph

    @property
    def n_tokens(self) -> int:
        return sum(len(text.split()) for level, text in self.blocks if level == 0)


def sample_dump_path() -> Path:
    """Path of the Wikipedia sample inside the installed gensim package (not imported to find it)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise InputError("gensim is not installed; install the demo extra: pip install 'fflayers[demo]'")
    path = Path(spec.origin).parent / "test" / "test_data" / SAMPLE_NAME
    if not path.exists():
        raise InputError(f"the gensim wheel has no {SAMPLE_NAME}; reinstall gensim>=4.3 from PyPI")
    return path


def _clean(text: str) -> str:
    """Remove markup that gensim's filter_wiki leaves behind (bold/italic quotes, emptied parentheses)."""
    text = text.replace("'''", "").replace("''", "")
    text = re.sub(r"\(\s*(?:[;,]\s*)+", "(", text)
    text = re.sub(r"(?:\s*[;,])+\s*\)", ")", text)
    text = re.sub(r"\(\s*\)", "", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def _is_prose(line: str) -> bool:
    if not line or line[0] in "*#:;|{}!=<" or _MEDIA.search(line):
        return False
    return len(line.split()) >= MIN_PARAGRAPH_WORDS and bool(_PROSE_END.search(line))


def _prune_empty_headings(blocks: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Keep a heading only when a paragraph follows it before the next heading of its level or higher."""
    kept: list[tuple[int, str]] = []
    # Scanning backwards, headings of a level below `limit` have a paragraph somewhere in their section.
    limit = 0
    for level, text in reversed(blocks):
        if level == 0:
            kept.append((level, text))
            limit = 1_000
        elif level < limit:
            kept.append((level, text))
            limit = level
    return kept[::-1]


def _iter_articles(dump: Path, tokenize) -> Iterator[Article]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(dump, "rb") as f:
        for title, wikitext, _ in extract_pages(f, filter_namespaces=("0",)):
            if not wikitext or wikitext.lstrip()[:9].lower() == "#redirect":
                continue
            if ":" in title or "(disambiguation)" in title or title.startswith("List of"):
                continue
            article = Article(tokenize(title))
            skipping_level = 0  # inside a skipped section of this level (0 = not skipping)
            for raw in filter_wiki(wikitext).splitlines():
                line = raw.strip()
                m = _HEADING.match(line)
                if m:
                    level, name = len(m.group(1)), _clean(m.group(2))
                    if skipping_level and level > skipping_level:
                        continue
                    skipping_level = level if name.lower() in SKIP_SECTIONS else 0
                    if not skipping_level and name:
                        article.blocks.append((level, tokenize(name)))
                    continue
                if skipping_level:
                    continue
                line = _clean(line)
                if _is_prose(line):
                    article.blocks.append((0, tokenize(line)))
            article.blocks = _prune_empty_headings(article.blocks)
            if article.n_tokens >= MIN_ARTICLE_TOKENS:
                yield article


def _make_tokenizer():
    from sacremoses import MosesTokenizer

    moses = MosesTokenizer(lang="en")

    def tokenize(text: str) -> str:
        out = moses.tokenize(text, aggressive_dash_splits=True, escape=False, return_str=True)
        return " ".join(_NUMBER_SEP.sub(r" @\1@ ", out).split())

    return tokenize


def _render(articles: list[Article]) -> list[str]:
    lines: list[str] = []
    for art in articles:
        lines += [" ", f" = {art.title} = ", " "]
        for level, text in art.blocks:
            if level == 0:
                lines.append(f" {text} ")
            else:
                marks = " ".join(["="] * level)
                if lines[-1] != " ":
                    lines.append(" ")
                lines += [f" {marks} {text} {marks} ", " "]
    return lines


def _write_atomic(path: Path, lines: list[str]) -> None:
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")


def build_corpus(
    out_dir: str | os.PathLike, max_articles: int | None = None, source: str | os.PathLike | None = None
) -> dict[str, dict]:
    """Write ``wiki.{train,valid,test}.tokens`` under ``out_dir``.

    ``max_articles`` keeps the first N usable articles of the dump (at least 3: one per split);
    ``source`` is a MediaWiki XML ``.bz2`` dump (default: the sample in the gensim wheel).
    Returns ``{split: {"path", "articles", "lines", "tokens"}}``; lines and tokens count paragraph lines
    only (headings and blank lines excluded), the lines :func:`fflayers.data.read_wikitext_lines` returns.
    """
    if max_articles is not None and max_articles < 3:
        raise InputError(
            f"max_articles={max_articles} is too small; pass at least 3 (one article per split)"
        )
    dump = Path(source) if source is not None else sample_dump_path()
    if not dump.exists():
        raise InputError(f"Wikipedia dump {str(dump)!r} does not exist; check --source")
    try:
        import gensim.corpora.wikicorpus  # noqa: F401
    except ImportError as e:
        raise InputError(
            f"cannot import gensim ({e}); install the demo extra: pip install 'fflayers[demo]'"
        ) from None

    articles: list[Article] = []
    for art in _iter_articles(dump, _make_tokenizer()):
        articles.append(art)
        if max_articles is not None and len(articles) >= max_articles:
            break
    n = len(articles)
    if n < 3:
        raise InputError(
            f"{str(dump)!r} gave only {n} usable articles; a split needs at least 3, use a larger dump"
        )
    n_held = max(1, min(5, n // 10))
    splits = {
        "train": articles[: n - 2 * n_held],
        "valid": articles[n - 2 * n_held : n - n_held],
        "test": articles[n - n_held :],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, dict] = {}
    for name, arts in splits.items():
        path = out / f"wiki.{name}.tokens"
        _write_atomic(path, _render(arts))
        paragraphs = [text for art in arts for level, text in art.blocks if level == 0]
        result[name] = {
            "path": path,
            "articles": len(arts),
            "lines": len(paragraphs),
            "tokens": sum(len(p.split()) for p in paragraphs),
        }
    return result


def summary(result: dict[str, dict]) -> str:
    """One line: articles, paragraph lines and tokens per split."""
    parts = [
        f"{name}: {s['articles']} articles, {s['lines']} lines, {s['tokens']} tokens"
        for name, s in result.items()
    ]
    return f"wrote {result['train']['path'].parent}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True, help="folder for wiki.{train,valid,test}.tokens")
    parser.add_argument("--max_articles", type=int, default=None, help="use only the first N usable articles")
    parser.add_argument("--source", default=None, help="MediaWiki XML .bz2 dump (default: gensim's sample)")
    args = parser.parse_args(argv)
    try:
        result = build_corpus(args.out_dir, max_articles=args.max_articles, source=args.source)
    except FflayersError as e:
        raise SystemExit(f"error: {e}") from None
    print(summary(result))
    return result


if __name__ == "__main__":
    main()
