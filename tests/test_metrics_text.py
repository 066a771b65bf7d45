"""Turkish text metrics: sacrebleu parity, the Turkish casing/tokenisation battery, EM/F1, registry, perplexity."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from trmlx.metrics import (
    compute,
    compute_with_signature,
    metric_kind,
    metric_names,
    normalize_answer,
    per_task,
    perplexity,
    tokenize_tr,
    turkish_lower,
)

HYPS = [
    "Ankara'da bugün hava çok güzel.",
    "IŞIK hızıyla geldi ve gitti.",
    "İstanbul Boğazı'nda gemiler geçiyor.",
    "Öğrenciler sınavdan önce çalıştılar.",
    "Çocuklar bahçede “top” oynuyor.",
]
REFS = [
    "Ankara'da hava bugün çok güzeldi.",
    "ışık hızıyla gelip gitti.",
    "İstanbul Boğazı'ndan gemiler geçiyor.",
    "Öğrenciler sınavdan önce çok çalıştı.",
    "Çocuklar bahçede top oynuyorlar.",
]
REFS2 = [
    "Bugün Ankara'da hava çok güzel.",
    "Işık hızıyla geldi, gitti.",
    "Gemiler İstanbul Boğazı'ndan geçiyor.",
    "Sınavdan önce öğrenciler çalıştılar.",
    "Çocuklar bahçede top oynuyor.",
]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _sacrebleu_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sacrebleu", *args], capture_output=True, text=True, encoding="utf-8", check=True
    )
    return done.stdout


@pytest.mark.parametrize("tokenize", ["13a", "intl", "char"])
def test_bleu_chrf_match_sacrebleu_cli(tmp_path, tokenize):
    ref = _write(tmp_path / "ref.txt", REFS)
    hyp = _write(tmp_path / "hyp.txt", HYPS)
    out = _sacrebleu_cli(ref, "-i", hyp, "-m", "bleu", "chrf", "-tok", tokenize, "-b", "-w", "4")
    cli_bleu, cli_chrf = json.loads(out)
    assert round(compute("bleu", HYPS, REFS, tokenize=tokenize)["bleu"], 4) == cli_bleu
    assert round(compute("chrf", HYPS, REFS)["chrf"], 4) == cli_chrf


def test_multi_reference_chrfpp_and_signature_match_sacrebleu_cli(tmp_path):
    ref1 = _write(tmp_path / "ref1.txt", REFS)
    ref2 = _write(tmp_path / "ref2.txt", REFS2)
    hyp = _write(tmp_path / "hyp.txt", HYPS)
    multi = [[a, b] for a, b in zip(REFS, REFS2)]
    bleu_out, chrf_out = json.loads(_sacrebleu_cli(ref1, ref2, "-i", hyp, "-m", "bleu", "chrf", "-w", "4"))
    scores, sigs = compute_with_signature("bleu", HYPS, multi)
    assert round(scores["bleu"], 4) == bleu_out["score"]
    assert sigs["bleu"] == bleu_out["signature"]
    assert "nrefs:2" in sigs["bleu"]
    assert round(compute("chrf", HYPS, multi)["chrf"], 4) == chrf_out["score"]
    pp = json.loads(_sacrebleu_cli(ref1, ref2, "-i", hyp, "-m", "chrf", "--chrf-word-order", "2", "-b", "-w", "4"))
    assert round(compute("chrf++", HYPS, multi)["chrf++"], 4) == pp


def test_turkish_lowercase_bleu_equals_sacrebleu_on_pre_lowered_text_and_differs_from_its_lc(tmp_path):
    hyps = ["IŞIK ILIK BİR IŞIKTI", "İZMİR İLE IĞDIR"]
    refs = ["ışık ılık bir ışıktı", "izmir ile ığdır"]
    ref = _write(tmp_path / "ref.txt", [turkish_lower(r) for r in refs])
    hyp = _write(tmp_path / "hyp.txt", [turkish_lower(h) for h in hyps])
    expected = json.loads(_sacrebleu_cli(ref, "-i", hyp, "-m", "bleu", "-b", "-w", "4"))
    scores, sigs = compute_with_signature("bleu", hyps, refs, lowercase=True)
    assert round(scores["bleu"], 4) == expected == 100.0
    assert sigs["bleu"].endswith("|case:tr-lower")
    # sacrebleu's own lowercase=True uses str.lower(): I -> i, so the same pair no longer matches.
    ref_raw = _write(tmp_path / "ref_raw.txt", refs)
    hyp_raw = _write(tmp_path / "hyp_raw.txt", hyps)
    assert json.loads(_sacrebleu_cli(ref_raw, "-i", hyp_raw, "-m", "bleu", "-lc", "-b", "-w", "4")) < 50.0


def test_turkish_lower():
    assert turkish_lower("IıİiÇŞĞÜÖ") == "ııiiçşğüö"
    assert turkish_lower("I\u0307STANBUL") == "istanbul"  # decomposed İ composes under NFC first
    assert len("İ".lower()) == 2  # why str.lower is wrong: i + U+0307
    assert turkish_lower("IŞIK") != "IŞIK".lower()


def test_normalize_answer():
    assert normalize_answer("  “İSTANBUL’un”  güzel…  ") == "istanbulun güzel"
    assert normalize_answer("«Ankara'da» — başkent!") == "ankarada başkent"
    assert normalize_answer("The  Cat's hat!", lang="en") == "cats hat"
    with pytest.raises(ValueError, match="unknown lang"):
        normalize_answer("x", lang="de")


def test_tokenizer_keeps_turkish_letters_and_splits_punctuation():
    assert tokenize_tr("“İstanbul’da” IŞIK, 2024!") == ["istanbul", "da", "ışık", "2024"]
    assert tokenize_tr("çiçek şişek") == ["çiçek", "şişek"]


def test_rouge_default_tokenizer_bug_is_avoided():
    from rouge_score import rouge_scorer

    assert compute("rouge", ["çiçek"], ["şişek"])["rougeL"] == 0.0
    assert rouge_scorer.RougeScorer(["rougeL"]).score("çiçek", "şişek")["rougeL"].fmeasure == 1.0


def test_rouge_turkish_casing():
    scores = compute("rouge", ["KIRMIZI İZMİR"], ["kırmızı izmir"])
    assert scores == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0}
    # Python casing would turn KIRMIZI into "kirmizi" and miss.
    assert compute("rouge", ["kirmizi"], ["kırmızı"])["rouge1"] == 0.0


def test_rouge_apostrophe_suffixes_hand_computed():
    # pred tokens: ankara da hava güzel (4); ref: ankara da hava çok güzel (5)
    s = compute("rouge", ["Ankara'da hava güzel"], ["ANKARA'DA HAVA ÇOK GÜZEL"])
    assert s["rouge1"] == pytest.approx(100 * 8 / 9)  # P=1, R=4/5
    assert s["rouge2"] == pytest.approx(100 * 4 / 7)  # 2 common bigrams: P=2/3, R=2/4
    assert s["rougeL"] == pytest.approx(100 * 8 / 9)  # LCS = 4


def test_rouge_unicode_quotes_hand_computed():
    # pred: ankara başkenttir (2); ref: ankara türkiye nin başkentidir (4); one common unigram
    s = compute("rouge", ["“Ankara” başkenttir"], ["Ankara Türkiye’nin başkentidir"])
    assert s["rouge1"] == pytest.approx(100 / 3)  # P=1/2, R=1/4
    assert s["rouge2"] == 0.0
    assert s["rougeL"] == pytest.approx(100 / 3)


def test_rouge_lsum_splits_on_newlines_and_multi_reference_takes_best():
    s = compute("rouge", ["köpek havladı\nkedi uyudu"], ["kedi uyudu\nköpek havladı"])
    assert s["rougeL"] == pytest.approx(50.0)  # LCS over the flat text is 2 of 4
    assert s["rougeLsum"] == pytest.approx(100.0)  # each reference sentence fully covered
    multi = compute("rouge", ["kedi uyudu"], [["köpek havladı", "Kedi uyudu."]])
    assert multi["rouge1"] == 100.0


def test_rouge_english_mode_uses_stemmer():
    assert compute("rouge", ["The cats are running"], ["the cat is running"], lang="en")["rouge1"] == pytest.approx(
        100 * 3 / 4
    )  # the, cat(s), run(ning) match after Porter stemming; are/is do not


def test_exact_match_battery():
    assert compute("em", ["İSTANBUL"], ["istanbul"]) == {"em": 100.0}
    assert compute("em", ["IŞIK"], ["ışık"]) == {"em": 100.0}
    assert compute("em", ["“Ankara”"], ["Ankara"]) == {"em": 100.0}
    assert compute("em", ["IŞIK"], ["işik"])["em"] == 0.0  # I is dotless in Turkish
    assert compute("em", ["IŞIK"], ["işik"], lang="en")["em"] == 100.0
    assert compute("em", ["The Cat"], ["cat"], lang="en")["em"] == 100.0
    assert compute("em", ["The Cat"], ["cat"], lang="tr")["em"] == 0.0
    assert compute("em", ["İzmir", "Bursa"], [["Ankara", "İZMİR"], "Konya"])["em"] == 50.0


def test_token_f1_exact_fractions():
    assert compute("f1", ["Ankara'nın merkezi"], ["Ankara'nın tarihi merkezi"])["f1"] == pytest.approx(80.0)
    assert compute("f1", ["büyük bir şehir olan İzmir"], ["İZMİR"])["f1"] == pytest.approx(100 / 3)
    assert compute("f1", ["İzmir"], [["Ankara", "izmir şehri"]])["f1"] == pytest.approx(200 / 3)
    assert compute("f1", ["kedi", "kedi köpek"], ["köpek", "köpek"])["f1"] == pytest.approx((0 + 200 / 3) / 2)
    assert compute("f1", ["The cat sat"], ["a cat sat down"], lang="en")["f1"] == pytest.approx(100 * 4 / 5)


def test_registry():
    assert metric_names() == [
        "bleu", "chrf", "chrf++", "rouge", "em", "f1", "perplexity",
        "accuracy@k", "precision@k", "recall@k", "mrr@k", "ndcg@k", "map@k",
    ]  # fmt: skip
    assert [metric_kind(n) for n in ("bleu", "chrf++", "f1", "perplexity")] == ["text", "text", "text", "lm"]
    assert metric_kind("accuracy@3") == metric_kind("ndcg@10") == metric_kind("map@100") == "retrieval"
    for bad in ("mrr", "accuracy@0", "accuracy@k", "ndcg@-1", "ndcg@1.5", "BLEU", "meteor", "recall@03"):
        assert metric_kind(bad) is None, bad
    with pytest.raises(ValueError, match="available: bleu"):
        compute("meteor", ["a"], ["a"])
    with pytest.raises(ValueError, match="lm metric"):
        compute("perplexity", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute("em", ["a", "b"], ["a"])


def test_per_task_and_macro():
    rows = [
        {"task": "qa", "prediction": "İSTANBUL", "reference": "istanbul"},
        {"task": "qa", "prediction": "Ankara", "reference": ["İzmir", "Bursa"]},
        {"task": "qa_en", "prediction": "The Cat", "reference": "cat", "lang": "en"},
    ]
    out = per_task(["em", "f1"], rows)
    assert out["per_task"] == {"qa": {"em": 50.0, "f1": 50.0}, "qa_en": {"em": 100.0, "f1": 100.0}}
    assert out["macro"] == {"em": 75.0, "f1": 75.0}
    with pytest.raises(ValueError, match="mixes languages"):
        per_task(["em"], [{**rows[0], "lang": "en"}, rows[1]])


def test_perplexity_is_token_weighted():
    out = perplexity([(2.0, 1), (6.0, 3)])  # per-example means 2 and 2 -> 2; token-weighted 8/4 = 2
    assert out == {"nll": 2.0, "perplexity": pytest.approx(math.exp(2.0)), "tokens": 4.0}
    skewed = perplexity([(1.0, 1), (30.0, 10)])  # 31/11, not the mean of 1 and 3
    assert skewed["nll"] == pytest.approx(31 / 11)
    assert perplexity([(1e6, 1)])["perplexity"] == math.inf
    with pytest.raises(ValueError, match="at least one"):
        perplexity([(0.0, 0)])
    with pytest.raises(ValueError, match="non-negative integer"):
        perplexity([(1.0, -2)])


def test_import_is_light():
    code = (
        "import sys, trmlx.metrics; "
        "print(sorted(m for m in ('numpy', 'sacrebleu', 'rouge_score', 'torch', 'mlx') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
