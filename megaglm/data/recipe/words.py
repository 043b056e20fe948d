"""An offline word tokenizer for datatrove's filters and MinHash shingling.

datatrove assigns spaCy (English) or spaCy + jieba (Chinese) word tokenizers to languages; those are
large optional installs. Its filters and ``MinhashDedupSignature`` accept any ``WordTokenizer``
instead, and this one needs only the ``regex`` module: a word is a run of letters, marks, digits or
``_`` (``\\p{L}\\p{M}\\p{N}_``), except that each Han, Hiragana, Katakana or Hangul character is a word of
its own (those scripts do not separate words with spaces; one character per word is the usual unit
of CJK n-gram shingling), and each other non-space character (punctuation, symbols) is a word of its
own. Sentences end at ``. ! ?`` and their CJK forms ``。！？`` followed by space or end of text, or at
a line break.
"""

from __future__ import annotations

import regex
from datatrove.utils.word_tokenizers import WordTokenizer

__all__ = ["UnicodeWordTokenizer", "is_cjk_language"]

_CJK_SET = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
_WORD = regex.compile(
    rf"[{_CJK_SET}]"  # one CJK character
    rf"|[[\p{{L}}\p{{M}}\p{{N}}_]--[{_CJK_SET}]]+"  # a run of other letters / marks / digits
    rf"|[^\s\p{{L}}\p{{M}}\p{{N}}_]",  # one punctuation mark or symbol
    regex.V1,
)
_SENTENCE_END = regex.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n+")
_CJK_LANGS = frozenset({"zh", "ja", "ko", "yue", "wuu"})


def is_cjk_language(code: str | None) -> bool:
    """Whether an ISO 639-1/3 language code is Chinese, Japanese or Korean (words = characters)."""
    return (code or "").split("_")[0].split("-")[0] in _CJK_LANGS


class UnicodeWordTokenizer(WordTokenizer):
    """Regex word tokenizer (see the module docstring); ``language`` is informational only.

    ``word_tokenize(text) -> list[str]`` (words in order, no whitespace), ``sent_tokenize(text) ->
    list[str]`` (stripped, non-empty), ``span_tokenize(text) -> list[(start, end)]`` (character
    offsets of the sentences).
    """

    def __init__(self, language: str | None = None):
        super().__init__(language)

    def word_tokenize(self, text: str) -> list[str]:
        """Words of ``text`` (see the module docstring)."""
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        """Sentences of ``text``, stripped, empty ones dropped."""
        return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        """``(start, end)`` character offsets of the sentences (before stripping)."""
        spans, start = [], 0
        for m in _SENTENCE_END.finditer(text):
            if m.start() > start and text[start:m.start()].strip():
                spans.append((start, m.start()))
            start = m.end()
        if start < len(text) and text[start:].strip():
            spans.append((start, len(text)))
        return spans

    def __repr__(self) -> str:
        return f"UnicodeWordTokenizer({self.language!r})"
