"""Generation metrics: sacrebleu BLEU/chrF/chrF++, ROUGE with a Turkish tokenizer, SQuAD-style EM and token F1.

All scores are on the 0–100 scale. sacrebleu, rouge-score and numpy are imported inside the functions so that
`import trmlx.metrics` stays cheap.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from trmlx.metrics.text import TurkishRougeTokenizer, check_lang, normalize_answer, turkish_lower

BLEU_TOKENIZERS = ("13a", "intl", "char")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TR_LOWER_MARK = "|case:tr-lower"

References = Sequence["str | Sequence[str]"]


def as_ref_lists(references: References) -> list[list[str]]:
    """Turn references (one string or a list of gold strings per example) into a list of non-empty lists."""
    out: list[list[str]] = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"reference {i} must be a string or a non-empty list of strings, got {ref!r}")
        out.append(refs)
    return out


def check_pair(predictions: Sequence[str], references: References) -> list[list[str]]:
    """Validate that predictions and references are non-empty and aligned; return references as lists."""
    refs = as_ref_lists(references)
    if len(predictions) != len(refs):
        raise ValueError(f"{len(predictions)} predictions but {len(refs)} references")
    if not refs:
        raise ValueError("no examples to score")
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise ValueError(f"prediction {i} must be a string, got {type(pred).__name__}")
    return refs


def _ref_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """Transpose per-example reference lists into sacrebleu's reference streams (None pads missing refs)."""
    width = max(len(r) for r in refs)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(width)]


def sacrebleu_metric(name: str, tokenize: str = "13a") -> Any:
    """Build the sacrebleu metric object for "bleu", "chrf" or "chrf++" (sacrebleu's own defaults otherwise)."""
    from sacrebleu.metrics import BLEU, CHRF

    if name == "bleu":
        if tokenize not in BLEU_TOKENIZERS:
            raise ValueError(f"unknown BLEU tokenizer {tokenize!r}; expected one of: {', '.join(BLEU_TOKENIZERS)}")
        return BLEU(tokenize=tokenize)
    if name == "chrf":
        return CHRF()
    if name == "chrf++":
        return CHRF(word_order=2)
    raise ValueError(f"{name!r} is not a sacrebleu metric")


def _prepare(predictions: Sequence[str], references: References, lowercase: bool):
    """Validate, optionally apply Turkish lowercasing, and return (hyps, sacrebleu reference streams)."""
    refs = check_pair(predictions, references)
    hyps = list(predictions)
    if lowercase:
        hyps = [turkish_lower(h) for h in hyps]
        refs = [[turkish_lower(r) for r in rr] for rr in refs]
    return hyps, _ref_streams(refs)


def _signature(metric: Any, lowercase: bool) -> str:
    """sacrebleu's signature, plus `|case:tr-lower` when we lowercased with Turkish rules before sacrebleu."""
    sig = metric.get_signature().format()
    return sig + TR_LOWER_MARK if lowercase else sig


def sacrebleu_score(
    name: str, predictions: Sequence[str], references: References, tokenize: str = "13a", lowercase: bool = False
) -> tuple[float, str]:
    """Corpus BLEU/chrF/chrF++ on the 0–100 scale and its signature, exactly as sacrebleu computes it.

    `lowercase` applies `turkish_lower` to both sides (sacrebleu's own lowercase=True uses str.lower, wrong for
    I/İ); sacrebleu then sees `case:mixed` and the signature gets `|case:tr-lower` appended.
    """
    metric = sacrebleu_metric(name, tokenize)
    hyps, streams = _prepare(predictions, references, lowercase)
    score = metric.corpus_score(hyps, streams)
    return float(score.score), _signature(metric, lowercase)


def sacrebleu_stats(
    name: str, predictions: Sequence[str], references: References, tokenize: str = "13a", lowercase: bool = False
) -> tuple[Any, Any, str]:
    """Per-sentence sufficient statistics (numpy n × d) for resampling; returns (metric, stats, signature).

    Summing rows of `stats` and calling `metric._compute_score_from_stats` reproduces corpus scores.
    """
    import numpy as np

    metric = sacrebleu_metric(name, tokenize)
    hyps, streams = _prepare(predictions, references, lowercase)
    stats = metric._extract_corpus_statistics(hyps, streams)
    return metric, np.asarray(stats, dtype=np.float64), _signature(metric, lowercase)


def bleu(
    predictions: Sequence[str], references: References, tokenize: str = "13a", lowercase: bool = False
) -> tuple[float, str]:
    """Corpus BLEU (sacrebleu, 0–100) and its signature; `tokenize` is 13a (default), intl or char."""
    return sacrebleu_score("bleu", predictions, references, tokenize, lowercase)


def chrf(
    predictions: Sequence[str], references: References, plus_plus: bool = False, lowercase: bool = False
) -> tuple[float, str]:
    """Corpus chrF (or chrF++ with word bigrams when `plus_plus`) from sacrebleu, 0–100, and its signature."""
    return sacrebleu_score("chrf++" if plus_plus else "chrf", predictions, references, lowercase=lowercase)


def rouge_scorer(lang: str = "tr", rouge_types: Sequence[str] = ROUGE_TYPES) -> Any:
    """RougeScorer for `lang`: "tr" uses the Unicode Turkish tokenizer without stemming, "en" the stock one.

    "en" keeps rouge-score's default tokenizer with use_stemmer=True so English numbers match published ones.
    """
    from rouge_score import rouge_scorer as rs

    check_lang(lang)
    if lang == "en":
        return rs.RougeScorer(list(rouge_types), use_stemmer=True)
    return rs.RougeScorer(list(rouge_types), tokenizer=TurkishRougeTokenizer())


def rouge_signature(lang: str) -> str:
    """Describe the ROUGE configuration so reported numbers can be reproduced."""
    from importlib.metadata import version

    tok = "rouge-score-default|stem:porter" if lang == "en" else "unicode-words|case:tr-lower|stem:no"
    return f"lang:{lang}|tok:{tok}|lsum:newline|multiref:max-f|agg:mean-f|version:{version('rouge-score')}"


def rouge_example_scores(
    predictions: Sequence[str], references: References, lang: str = "tr"
) -> dict[str, list[float]]:
    """Per-example ROUGE F-measures ×100 for rouge1/2/L/Lsum; with several references the best F is kept."""
    refs = check_pair(predictions, references)
    scorer = rouge_scorer(lang)
    out: dict[str, list[float]] = {t: [] for t in ROUGE_TYPES}
    for pred, gold in zip(predictions, refs):
        scores = scorer.score_multi(gold, pred)
        for t in ROUGE_TYPES:
            out[t].append(100.0 * scores[t].fmeasure)
    return out


def rouge(predictions: Sequence[str], references: References, lang: str = "tr") -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure ×100; Lsum treats newlines as sentence boundaries."""
    per = rouge_example_scores(predictions, references, lang)
    return {t: sum(v) / len(v) for t, v in per.items()}


def _f1_tokens(pred_toks: list[str], gold_toks: list[str]) -> float:
    """SQuAD token F1 between two token lists; both empty counts as a match (SQuAD v2 convention)."""
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    same = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def em_example_scores(predictions: Sequence[str], references: References, lang: str = "tr") -> list[float]:
    """Per-example exact match ×100 after `normalize_answer`, maximised over the gold answers."""
    refs = check_pair(predictions, references)
    check_lang(lang)
    out = []
    for pred, gold in zip(predictions, refs):
        p = normalize_answer(pred, lang)
        out.append(100.0 * max(float(p == normalize_answer(g, lang)) for g in gold))
    return out


def f1_example_scores(predictions: Sequence[str], references: References, lang: str = "tr") -> list[float]:
    """Per-example SQuAD token F1 ×100 after `normalize_answer`, maximised over the gold answers."""
    refs = check_pair(predictions, references)
    check_lang(lang)
    out = []
    for pred, gold in zip(predictions, refs):
        p = normalize_answer(pred, lang).split()
        out.append(100.0 * max(_f1_tokens(p, normalize_answer(g, lang).split()) for g in gold))
    return out


def exact_match(predictions: Sequence[str], references: References, lang: str = "tr") -> float:
    """Mean SQuAD-style exact match ×100 with the language-aware normaliser."""
    per = em_example_scores(predictions, references, lang)
    return sum(per) / len(per)


def token_f1(predictions: Sequence[str], references: References, lang: str = "tr") -> float:
    """Mean SQuAD-style token F1 ×100 with the language-aware normaliser."""
    per = f1_example_scores(predictions, references, lang)
    return sum(per) / len(per)


def squad_signature(lang: str) -> str:
    """Describe the EM/F1 normalisation so reported numbers can be reproduced."""
    norm = "squad-en" if lang == "en" else "nfc+tr-lower+strip-unicode-punct+fold-space"
    return f"lang:{lang}|norm:{norm}|multiref:max"
