"""`trmlx score`: JSON output values, per-task tables, and one-line user errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trmlx.cli import main
from trmlx.metrics import compute


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _run(*args: str):
    return CliRunner().invoke(main, ["score", *args])


def _json(*args: str) -> dict:
    result = _run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


HYPS = ["Ankara'da hava bugün çok güzel.", "IŞIK hızıyla geldi.", "İstanbul büyük bir şehir."]
REFS = ["Ankara'da bugün hava güzel.", "ışık hızıyla geldi.", "İstanbul çok büyük bir şehir."]


def test_text_files_json(tmp_path):
    hyp, ref = _write(tmp_path / "hyp.txt", HYPS), _write(tmp_path / "ref.txt", REFS)
    out = _json("--metric", "bleu", "--metric", "chrf", "--metric", "rouge", "--hyp", hyp, "--ref", ref)
    assert out["n"] == 3
    assert out["scores"]["bleu"] == compute("bleu", HYPS, REFS)["bleu"]
    assert out["scores"]["chrf"] == compute("chrf", HYPS, REFS)["chrf"]
    assert out["scores"]["rougeL"] == compute("rouge", HYPS, REFS)["rougeL"]
    assert out["signatures"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")


def test_options_reach_the_metrics(tmp_path):
    hyp, ref = _write(tmp_path / "hyp.txt", HYPS), _write(tmp_path / "ref.txt", REFS)
    ref2 = _write(tmp_path / "ref2.txt", HYPS)
    out = _json("--metric", "bleu", "--hyp", hyp, "--ref", ref, "--tokenize", "intl", "--lowercase")
    assert out["scores"]["bleu"] == compute("bleu", HYPS, REFS, tokenize="intl", lowercase=True)["bleu"]
    assert out["signatures"]["bleu"].endswith("|case:tr-lower") and "tok:intl" in out["signatures"]["bleu"]
    multi = _json("--metric", "bleu", "--hyp", hyp, "--ref", ref, "--ref", ref2)
    assert multi["scores"]["bleu"] == pytest.approx(100.0) and "nrefs:2" in multi["signatures"]["bleu"]


def test_jsonl_with_tasks_and_lang(tmp_path):
    rows = [
        {"task": "qa", "prediction": "İSTANBUL", "reference": ["istanbul", "İst."]},
        {"task": "qa", "prediction": "“Ankara”", "reference": "Ankara"},
        {"task": "qa", "prediction": "IŞIK", "reference": "işik"},
        {"task": "qa", "prediction": "Bursa", "reference": "İzmir"},
        {"task": "sum", "prediction": "The Cat", "reference": "cat"},
    ]
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    out = _json("--metric", "em", "--predictions", str(path))
    assert out["scores"] == {"em": 40.0}
    assert out["per_task"] == {"qa": {"em": 50.0}, "sum": {"em": 0.0}}
    assert out["macro"] == {"em": 25.0}
    english = _json("--metric", "em", "--predictions", str(path), "--lang", "en")
    # English SQuAD normalisation: "The Cat" matches "cat", but İ/“ ” are not handled, and I lowers to i.
    assert english["per_task"] == {"qa": {"em": 25.0}, "sum": {"em": 100.0}}


def test_rich_table_output(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"task": "qa", "prediction": "a", "reference": "a"}\n', encoding="utf-8")
    result = _run("--metric", "f1", "--predictions", str(path))
    assert result.exit_code == 0, result.output
    assert "f1" in result.output and "100.00" in result.output and "macro" in result.output


def _error(*args: str) -> str:
    result = _run(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_line_count_mismatch_is_a_one_line_error(tmp_path):
    hyp, ref = _write(tmp_path / "hyp.txt", HYPS), _write(tmp_path / "ref.txt", REFS[:2])
    msg = _error("--metric", "bleu", "--hyp", hyp, "--ref", ref)
    assert "hyp.txt has 3 lines" in msg and "ref.txt has 2" in msg


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"prediction": "a", "reference": "a"}\n{"prediction": "b"\n', "p.jsonl:2: invalid JSON"),
        ('{"prediction": "a"}\n', "p.jsonl:1: missing 'reference' field"),
        ('{"prediction": "a", "reference": []}\n', "p.jsonl:1: 'reference' must be a string or a non-empty list"),
        ("[1, 2]\n", "p.jsonl:1: expected a JSON object"),
        ("\n\n", "has no examples"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, expected):
    path = tmp_path / "p.jsonl"
    path.write_text(content, encoding="utf-8")
    assert expected in _error("--metric", "em", "--predictions", str(path))


def test_other_user_errors(tmp_path):
    hyp = _write(tmp_path / "hyp.txt", HYPS)
    assert "reference file" in _error("--metric", "bleu", "--hyp", hyp, "--ref", str(tmp_path / "nope.txt"))
    unknown = _error("--metric", "meteor", "--hyp", hyp, "--ref", hyp)
    assert "'meteor'" in unknown and "available: bleu, chrf, chrf++, rouge, em, f1" in unknown
    assert "give --hyp" in _error("--metric", "bleu", "--hyp", hyp)
    (tmp_path / "latin1.txt").write_bytes("şehir\n".encode("cp1254"))
    assert "not valid UTF-8" in _error("--metric", "bleu", "--hyp", str(tmp_path / "latin1.txt"), "--ref", hyp)
