"""WikiText token text back to ordinary text, for subword models.

WikiText-103 files are word-tokenized: ``state @-@ of @-@ the @-@ art``, ``1 @,@ 000``, ``3 @.@ 14``, spaces
before punctuation (``word ,``), split clitics (``John 's``, ``do n't``) and spaced quotes (``" Hi "``).
Word-level models (the fairseq WikiText-103 LM) were trained on that form and read it as it is; subword
models (GPT-2, Llama, ...) were trained on ordinary text, so :func:`detokenize_wikitext` undoes the
tokenization before their tokenizer sees it. ``<unk>`` stays as it is.
"""

from __future__ import annotations

__all__ = ["detokenize_wikitext", "model_sentences", "text_for_model"]

#: ``@x@`` joiners: the token between two words written without spaces.
_JOINERS = {"@-@": "-", "@,@": ",", "@.@": "."}
#: tokens written without a space before them.
_NO_SPACE_BEFORE = {".", ",", ";", ":", "!", "?", ")", "]", "}", "%", "...", "'s", "'S", "n't", "N'T", "'re",
                    "'ve", "'ll", "'m", "'d", "'RE", "'VE", "'LL", "'M", "'D", "'"}
#: tokens written without a space after them.
_NO_SPACE_AFTER = {"(", "[", "{", "$", "#"}


def detokenize_wikitext(text: str) -> str:
    """Ordinary text from one WikiText-tokenized line or sentence.

    >>> detokenize_wikitext('The state @-@ of @-@ the @-@ art , " 1 @,@ 000 " ( 3 @.@ 14 % ) is John \\'s .')
    'The state-of-the-art, "1,000" (3.14%) is John\\'s.'
    """
    out: list[str] = []
    glue_next = True  # no space before the next token (start of text, after "(" or a joiner)
    quote_open = False
    for tok in text.split():
        if tok in _JOINERS:
            out.append(_JOINERS[tok])
            glue_next = True
            continue
        if tok == '"':
            if quote_open:  # closing quote: attached to the word before it
                out.append('"')
                glue_next = False
            else:
                if not glue_next and out:
                    out.append(" ")
                out.append('"')
                glue_next = True
            quote_open = not quote_open
            continue
        if out and not glue_next and tok not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(tok)
        glue_next = tok in _NO_SPACE_AFTER
    return "".join(out)


def text_for_model(adapter, sentences: list[str], pretokenized: bool,
                   raw_wikitext: bool = False) -> list[str]:
    """The sentences as ``adapter`` should read them: WikiText token text is detokenized for subword models
    (trained on ordinary text) unless ``raw_wikitext``; word-level models (the fairseq LMs, which have a
    ``words`` method) read it as it is, and so does text that was never WikiText-tokenized."""
    word_level = callable(getattr(adapter.vocab, "words", None))
    if not pretokenized or word_level or raw_wikitext:
        return sentences
    return [detokenize_wikitext(s) for s in sentences]


def model_sentences(adapter, path, seed: int, max_sentences: int = -1,
                    raw_wikitext: bool = False) -> list[str]:
    """The corpus at ``path`` (WikiText ``.tokens``, text or ``.jsonl``) as shuffled sentences (``seed``,
    first ``max_sentences``; -1: all), in the form ``adapter`` reads (:func:`text_for_model`)."""
    from pathlib import Path

    from fflayers.data.readers import read_corpus
    from fflayers.data.sentences import shuffled_sentences

    pretokenized = Path(path).suffix.lower() == ".tokens"
    sentences = shuffled_sentences(read_corpus(path), seed=seed, max_sentences=max_sentences,
                                   pretokenized=pretokenized)
    return text_for_model(adapter, sentences, pretokenized, raw_wikitext)
