"""Paired bootstrap: determinism, self-comparison, significance, and exactness of the resampled corpus scores."""

from __future__ import annotations

import time

import numpy as np
import pytest

from trmlx.metrics import compute, paired_bootstrap

WORDS = "ev okul kitap kalem masa ışık çiçek şehir deniz güneş yağmur kedi köpek öğrenci İzmir Iğdır".split(" ")


def _corpus(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """References, a good system (mostly the reference) and a bad one (mostly random words)."""
    rng = np.random.default_rng(seed)
    refs, good, bad = [], [], []
    for _ in range(n):
        ref = [WORDS[i] for i in rng.integers(0, len(WORDS), size=rng.integers(5, 12))]
        noisy = [w if rng.random() < 0.85 else WORDS[rng.integers(len(WORDS))] for w in ref]
        junk = [w if rng.random() < 0.3 else WORDS[rng.integers(len(WORDS))] for w in ref]
        refs.append(" ".join(ref))
        good.append(" ".join(noisy))
        bad.append(" ".join(junk))
    return refs, good, bad


@pytest.mark.parametrize("metric", ["bleu", "chrf", "chrf++", "em", "f1", "rougeL", "rougeLsum"])
def test_self_comparison_gives_zero_and_p_one(metric):
    refs, good, _ = _corpus(40)
    out = paired_bootstrap(metric, good, good, refs, n_resamples=200, seed=3)
    assert out["diff"] == 0.0 and out["mean_diff"] == 0.0
    assert out["ci_low"] == out["ci_high"] == 0.0
    assert out["p_value"] == 1.0
    assert out["a"] == out["b"]


@pytest.mark.parametrize("metric", ["bleu", "chrf", "f1", "rouge"])
def test_clearly_better_system_is_significant(metric):
    refs, good, bad = _corpus(60)
    out = paired_bootstrap(metric, bad, good, refs, n_resamples=500, seed=0)
    assert out["diff"] > 0 and out["ci_low"] > 0
    assert out["p_value"] < 0.05
    reverse = paired_bootstrap(metric, good, bad, refs, n_resamples=500, seed=0)
    assert reverse["diff"] == pytest.approx(-out["diff"]) and reverse["p_value"] < 0.05


def test_full_set_scores_equal_compute():
    refs, good, bad = _corpus(30)
    out = paired_bootstrap("bleu", bad, good, refs, n_resamples=10)
    assert out["a"] == compute("bleu", bad, refs)["bleu"]
    assert out["b"] == compute("bleu", good, refs)["bleu"]
    assert out["diff"] == out["b"] - out["a"]
    rouge = paired_bootstrap("rouge", bad, good, refs, n_resamples=10)
    assert rouge["metric"] == "rougeL" and rouge["a"] == compute("rouge", bad, refs)["rougeL"]


@pytest.mark.parametrize("metric", ["bleu", "chrf++", "em"])
def test_resampled_score_equals_recomputing_on_the_drawn_examples(metric):
    # With one resample the reported mean_diff is that resample's difference; redo it by hand with compute().
    refs, good, bad = _corpus(25)
    seed = 11
    idx = np.random.default_rng(seed).integers(0, len(refs), size=(1, len(refs)))[0]
    pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
    name = metric
    expected = compute(name, pick(good), pick(refs))[name] - compute(name, pick(bad), pick(refs))[name]
    out = paired_bootstrap(metric, bad, good, refs, n_resamples=1, seed=seed)
    assert out["mean_diff"] == pytest.approx(expected, abs=1e-9)


def test_deterministic_with_seed_and_seed_matters():
    refs, good, bad = _corpus(50)
    first = paired_bootstrap("chrf", bad, good, refs, n_resamples=300, seed=7)
    assert paired_bootstrap("chrf", bad, good, refs, n_resamples=300, seed=7) == first
    other = paired_bootstrap("chrf", bad, good, refs, n_resamples=300, seed=8)
    assert other["diff"] == first["diff"] and other["mean_diff"] != first["mean_diff"]


def test_close_systems_are_not_significant():
    refs, good, _ = _corpus(60)
    rng = np.random.default_rng(5)
    tweaked = [g if rng.random() < 0.9 else r for g, r in zip(good, refs)]  # a few sentences fixed
    swapped = [r if rng.random() < 0.1 else g for g, r in zip(good, refs)]
    out = paired_bootstrap("f1", tweaked, swapped, refs, n_resamples=1000, seed=0)
    assert out["p_value"] > 0.05


def test_thousand_bleu_resamples_of_a_few_hundred_sentences_is_fast():
    refs, good, bad = _corpus(300)
    start = time.perf_counter()
    out = paired_bootstrap("bleu", bad, good, refs, n_resamples=1000, seed=0)
    assert time.perf_counter() - start < 20.0
    assert out["n_resamples"] == 1000 and out["ci_low"] <= out["mean_diff"] <= out["ci_high"]


def test_bad_arguments():
    refs, good, bad = _corpus(5)
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap("meteor", good, bad, refs)
    with pytest.raises(ValueError, match="4 predictions but 5 references"):
        paired_bootstrap("bleu", good, bad[:4], refs)
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap("bleu", good, bad, refs, n_resamples=0)
