"""Datasets as the hub publishes them, built offline in hub layout and loaded through datasets.load_dataset:
wmt16 (nested translation), SQuAD (several gold answers), XL-Sum (text/summary) — check → prepare → train/eval."""

from __future__ import annotations

import json

import pytest

from trmlx.data import prepare_data
from trmlx.errors import UserError
from trmlx.evaluate import score_predictions
from trmlx.recipe import load_recipe

WMT = {split: [{"translation": {"en": f"the cat sat {i}", "tr": f"kedi oturdu {i}"}} for i in range(n)]
       for split, n in (("train", 12), ("validation", 3), ("test", 4))}
SQUAD = [{"id": str(i), "question": f"soru {i}?", "context": f"bağlam {i} Ankara'da.",
          "answers": {"text": [f"Ankara {i}", f"Ankara'da {i}", f"Ankara {i}"][: 1 + i % 3],
                      "answer_start": [7, 7, 7][: 1 + i % 3]}} for i in range(6)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """load_dataset on a local folder writes Arrow files to the datasets cache: keep them in the test's folder."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def hub_folder(root, splits: dict[str, list[dict]]):
    """A dataset folder as the hub stores it: data/<split>-00000-of-00001.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def recipe(write, body: str, task: str = "causal", model: str = "m"):
    return load_recipe(write("r.toml", f'task = "{task}"\n[model]\npath = "{model}"\n' + body))


WMT_BODY = ('[data]\ndataset = "wmt16"\ncolumns = { source = "translation.en", target = "translation.tr" }\n'
            'template = "English: {translation.en}\\nTurkish: "\n')


def test_wmt16_shape_nested_columns_and_the_dataset_splits(write, tmp_path, cli):
    hub_folder(tmp_path / "wmt16", WMT)
    data = prepare_data(recipe(write, WMT_BODY))
    assert (len(data.train), len(data.valid), len(data.test)) == (12, 3, 4)
    first = data.test[0]
    assert (first.fields["source"], first.fields["target"]) == ("the cat sat 0", "kedi oturdu 0")
    assert first.origin == f"{tmp_path / 'wmt16'}[test]: row 1"
    from trmlx.data.examples import format_example

    assert format_example(first, recipe(write, WMT_BODY)) == ("English: the cat sat 0\nTurkish: ", "kedi oturdu 0")
    result = cli("check", str(tmp_path / "r.toml"), "--json", "--no-tokenizer")
    assert result.exit_code == 0, result.output
    (summary,) = json.loads(result.stdout)
    assert summary["dataset"]["splits"] == {"train": {"split": "train", "rows": 12},
                                            "valid": {"split": "validation", "rows": 3},
                                            "test": {"split": "test", "rows": 4}}
    assert summary["rows"] == {"train": {"": 12}, "valid": {"": 3}, "test": {"": 4}}
    shown = cli("check", str(tmp_path / "r.toml"), "--no-tokenizer")
    assert (f"dataset {tmp_path / 'wmt16'}: train ← train (12 rows), valid ← validation (3 rows), test ← test "
            "(4 rows); splits present: train, validation, test") in " ".join(shown.stdout.split())


def test_files_win_over_the_dataset_splits_and_splits_can_be_turned_off(write, tmp_path):
    hub_folder(tmp_path / "wmt16", WMT)
    write("mine.jsonl", [{"translation": {"en": "hello", "tr": "merhaba"}}])
    data = prepare_data(recipe(write, WMT_BODY + 'test = "mine.jsonl"\ndataset_valid_split = ""\n'))
    assert [r.fields["target"] for r in data.test] == ["merhaba"] and data.valid == []
    assert data.report.dataset["splits"] == {"train": {"split": "train", "rows": 12}}
    with pytest.raises(UserError) as err:
        prepare_data(recipe(write, WMT_BODY + 'dataset_test_split = "newstest2017"\n'))
    assert err.value.problems == [f"data.dataset '{tmp_path / 'wmt16'}': no split 'newstest2017' "
                                  "(data.dataset_test_split); splits present: train, validation, test"]


def test_nested_path_that_does_not_exist_lists_the_nested_columns(write, tmp_path):
    hub_folder(tmp_path / "wmt16", WMT)
    body = WMT_BODY.replace('"translation.tr"', '"translation.de"')
    with pytest.raises(UserError) as err:
        prepare_data(recipe(write, body))
    assert err.value.problems == [
        f"{tmp_path / 'wmt16'}[train]: missing column 'translation.de' (the target role); columns present: "
        "translation, translation.en, translation.tr; map yours with data.columns.target = \"...\""]


def test_squad_shape_several_gold_answers(write, tmp_path, cli):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(SQUAD), "validation": Dataset.from_list(SQUAD[:3])}).save_to_disk(
        str(tmp_path / "tquad"))
    body = ('[data]\ndataset = "tquad"\ncolumns = { target = "answers.text" }\n'
            'template = "answer: {question} context: {context}"\n')
    data = prepare_data(recipe(write, body, task="seq2seq"))
    assert [r.fields["target"] for r in data.train[:3]] == ["Ankara 0", "Ankara 1", "Ankara 2"]
    # Rows 1, 2, 4, 5 list 2-3 answers; after removing repeats (SQuAD repeats answers) row 5 keeps two.
    assert [r.references for r in data.train] == [("Ankara 0",), ("Ankara 1", "Ankara'da 1"),
                                                  ("Ankara 2", "Ankara'da 2"), ("Ankara 3",),
                                                  ("Ankara 4", "Ankara'da 4"), ("Ankara 5", "Ankara'da 5")]
    assert data.valid[1].reference() == ["Ankara 1", "Ankara'da 1"] and data.valid[0].reference() == "Ankara 0"
    assert data.report.multi_reference == {"train": 4, "valid": 2}
    assert data.train[0].fields["input"] == "answer: soru 0? context: bağlam 0 Ankara'da."
    # EM/F1 take the best gold answer, as SQuAD does: "Ankara'da 1" matches the second answer exactly.
    rows = [{"prediction": "Ankara'da 1", "reference": data.valid[1].reference(), "task": ""},
            {"prediction": "Ankara", "reference": data.valid[0].reference(), "task": ""}]
    r = load_recipe(tmp_path / "r.toml", ["eval.metrics=['em', 'f1']"])
    assert score_predictions(r, rows)["metrics"] == {"em": 50.0, "f1": pytest.approx(100 * (1 + 2 / 3) / 2)}
    result = cli("check", str(tmp_path / "r.toml"), "--json", "--no-tokenizer")
    (summary,) = json.loads(result.stdout)
    assert summary["multi_reference"] == {"train": 4, "valid": 2}
    assert ("2 valid rows have several reference answers: training uses the first, metrics take the best match"
            in summary["warnings"])


def test_xlsum_shape_null_summary_dropped_and_ratio_split_without_a_validation_split(write, tmp_path):
    rows = [{"id": str(i), "title": f"başlık {i}", "text": f"haber metni {i} " * 5, "summary": f"özet {i}"}
            for i in range(10)]
    rows[7]["summary"] = None
    hub_folder(tmp_path / "xlsum", {"train": rows, "test": rows[:2]})
    body = ('[data]\ndataset = "xlsum"\ncolumns = { input = "text", target = "summary" }\nvalid_ratio = 0.2\n'
            'split_seed = 1\n')
    data = prepare_data(recipe(write, body, task="seq2seq"))
    assert data.report.empty_dropped == {"target": 1}
    assert (len(data.train), len(data.valid), len(data.test)) == (7, 2, 2)
    assert data.report.dataset["splits"] == {"train": {"split": "train", "rows": 10},
                                             "test": {"split": "test", "rows": 2}}


def test_null_template_field_is_an_empty_field_not_the_text_none(write, tmp_path):
    rows = [{"question": f"q{i}", "context": f"c{i}", "answer": f"a{i}"} for i in range(4)]
    rows[2]["context"] = None
    path = write("qa.jsonl", rows)
    body = '[data]\ntrain = "qa.jsonl"\ncolumns = { target = "answer" }\ntemplate = "{question} | {context}"\n'
    data = prepare_data(recipe(write, body, task="seq2seq"))
    assert [r.fields["input"] for r in data.train] == ["q0 | c0", "q1 | c1", "q3 | c3"]
    assert data.report.warnings() == ["dropped 1 rows with an empty 'context' field"]
    with pytest.raises(UserError) as err:
        prepare_data(recipe(write, body + 'on_empty = "error"\n', task="seq2seq"))
    assert err.value.problems == [f"{path}:3: empty field 'context' (set data.on_empty = \"drop\" to skip such "
                                  "rows)"]




def test_wmt16_shape_trains_and_evaluates_on_the_dataset_test_split(write, tmp_path, cli):
    pytest.importorskip("mlx.core", reason="the MLX backend needs mlx")
    from tests.conftest import REPO

    hub_folder(tmp_path / "wmt16", WMT)
    tiny = REPO / "recipes" / "models" / "tiny-llama-tr"
    write("r.toml", f'task = "causal"\n[model]\npath = "{tiny}"\n' + WMT_BODY + "max_length = 64\n"
          "[peft]\nrank = 4\n[train]\nsteps = 2\nbatch_size = 4\nlog_every = 1\n"
          "[eval]\nmax_new_tokens = 4\nbatch_size = 4\n")
    out = tmp_path / "run"
    trained = cli("train", str(tmp_path / "r.toml"), "--output", str(out), "--json", "--backend", "mlx")
    assert trained.exit_code == 0, trained.output
    evaluated = cli("eval", str(out), "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["n"] == 4  # the dataset's own test split
    predictions = [json.loads(line) for line in (out / "predictions" / "test.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in predictions] == [f"kedi oturdu {i}" for i in range(4)]
    assert predictions[0]["origin"] == f"{tmp_path / 'wmt16'}[test]: row 1"


def test_dotted_paths_in_lookups_columns_and_templates():
    from trmlx.data.fields import MISSING, columns_of, get_path, placeholders, render

    row = {"a.b": "literal", "translation": {"en": "hi", "tr": "selam"},
           "answers": {"text": ["x", "y"]}, "spans": [{"text": "p"}, {"text": "q"}]}
    assert get_path(row, "a.b") == "literal" and get_path(row, "translation.tr") == "selam"
    assert get_path(row, "answers.text.1") == "y" and get_path(row, "spans.text") == ["p", "q"]
    assert get_path(row, "translation.de") is MISSING and get_path(row, "answers.text.5") is MISSING
    assert columns_of(row) == ["a.b", "translation", "translation.en", "translation.tr", "answers", "answers.text",
                               "spans", "spans.text"]
    template = "{translation.en} / {answers[text][0]} / {a.b!r}"
    assert placeholders(template) == ["translation.en", "answers.text.0", "a.b"]
    assert render(template, row) == "hi / x / 'literal'"


def test_answers_as_a_list_of_objects_and_indexed_template_fields(write):
    rows = [{"q": f"soru {i}", "answers": [{"text": f"cevap {i}"}, {"text": f"yanıt {i}"}]} for i in range(3)]
    write("qa.jsonl", rows)
    body = ('[data]\ntrain = "qa.jsonl"\ncolumns = { target = "answers.text" }\n'
            'template = "{q} (ipucu: {answers[0][text]})"\n')
    data = prepare_data(recipe(write, body, task="seq2seq"))
    assert data.train[2].fields["input"] == "soru 2 (ipucu: cevap 2)"
    assert data.train[2].reference() == ["cevap 2", "yanıt 2"] and data.report.multi_reference == {"train": 3}
