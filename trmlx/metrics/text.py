"""Turkish-aware text normalisation for metrics: casing, SQuAD-style answer normalisation, ROUGE tokenisation.

Python's own casing is wrong for Turkish (`"I".lower() == "i"`, `"İ".lower() == "i̇"`), and the usual English
normalisers drop ş ğ ı ö ü ç or keep Unicode punctuation, so every Turkish metric goes through these helpers.
"""

from __future__ import annotations

import re
import string
import unicodedata

LANGS = ("tr", "en")

_TR_UPPER_MAP = str.maketrans({"I": "ı", "İ": "i"})
_WORD_RE = re.compile(r"[^\W_]+")  # runs of Unicode letters/digits: keeps ş ğ ı ö ü ç, splits at ' - “ ” etc.
_EN_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_EN_PUNCT = frozenset(string.punctuation)


def check_lang(lang: str) -> str:
    """Return `lang` if it is a supported language code ("tr" or "en"), else raise ValueError."""
    if lang not in LANGS:
        raise ValueError(f"unknown lang {lang!r}; expected one of: {', '.join(LANGS)}")
    return lang


def turkish_lower(s: str) -> str:
    """Lowercase with Turkish rules (I→ı, İ→i) after NFC, so dotted/dotless i never merge or gain U+0307."""
    return unicodedata.normalize("NFC", s).translate(_TR_UPPER_MAP).lower()


def _remove_unicode_punct(s: str) -> str:
    """Delete every character in a Unicode punctuation category (P*): ' “ ” « » … ‘ ’ - and ASCII ones."""
    return "".join(ch for ch in s if not unicodedata.category(ch).startswith("P"))


def normalize_answer(s: str, lang: str = "tr") -> str:
    """SQuAD-style answer normalisation; "tr" uses Turkish casing and Unicode punctuation, no article rule.

    "en" is the official SQuAD normaliser (lower, drop ASCII punctuation, drop a/an/the, fold whitespace), so
    English numbers stay comparable with published ones.
    """
    check_lang(lang)
    if lang == "en":
        s = s.lower()
        s = "".join(ch for ch in s if ch not in _EN_PUNCT)
        s = _EN_ARTICLES_RE.sub(" ", s)
        return " ".join(s.split())
    s = turkish_lower(s)
    s = _remove_unicode_punct(s)
    return " ".join(s.split())


def tokenize_tr(text: str) -> list[str]:
    """Turkish word tokens for ROUGE: Turkish-lowercased runs of Unicode letters and digits (no stemming)."""
    return _WORD_RE.findall(turkish_lower(text))


class TurkishRougeTokenizer:
    """Tokenizer object for `rouge_score.rouge_scorer.RougeScorer(tokenizer=...)` that keeps Turkish letters.

    rouge-score's default tokenizer maps everything outside [a-z0-9] to spaces, which makes
    ROUGE("çiçek", "şişek") = 1; this one keeps every Unicode letter.
    """

    def tokenize(self, text: str) -> list[str]:
        """Split `text` into Turkish-lowercased letter/digit tokens."""
        return tokenize_tr(text)
