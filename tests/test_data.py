"""Data layer: every format loads; every bad input gets a one-line error naming file and line."""

from __future__ import annotations

import pytest

from trmlx.data import prepare_data, read_rows
from trmlx.errors import UserError
from trmlx.recipe import load_recipe

PAIRS = [{"source": f"sentence {i}", "target": f"cümle {i}"} for i in range(10)]


def recipe_for(write, body: str, task: str = "causal"):
    return load_recipe(write("r.toml", f'task = "{task}"\n[model]\npath = "m"\n' + body))


def error_of(fn, *args) -> list[str]:
    with pytest.raises(UserError) as err:
        fn(*args)
    return err.value.problems


def test_formats_load_the_same_rows(write, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    expected = [{"source": r["source"], "target": r["target"]} for r in PAIRS]
    paths = [
        write("a.jsonl", PAIRS),
        write("a.json", "[" + ",\n".join(f'{{"source": "{r["source"]}", "target": "{r["target"]}"}}'
                                          for r in PAIRS) + "]"),
        write("a.csv", "source,target\n" + "".join(f"{r['source']},{r['target']}\n" for r in PAIRS)),
        write("a.tsv", "source\ttarget\n" + "".join(f"{r['source']}\t{r['target']}\n" for r in PAIRS)),
    ]
    pq.write_table(pa.Table.from_pylist(expected), tmp_path / "a.parquet")
    Dataset.from_list(expected).save_to_disk(str(tmp_path / "saved"))
    paths += [tmp_path / "a.parquet", tmp_path / "saved"]
    for path in paths:
        assert [r.values for r in read_rows(path)] == expected, path
    assert read_rows(paths[0])[3].origin == f"{paths[0]}:4"
    assert read_rows(paths[2])[3].origin == f"{paths[2]}:5"  # line 1 is the header


def test_malformed_json_line_names_file_and_line(write):
    path = write("bad.jsonl", '{"source": "a", "target": "b"}\n{"source": "a" "target": "b"}\n')
    assert error_of(read_rows, path) == [f"{path}:2: malformed JSON: Expecting ',' delimiter (column 16)"]


def test_json_array_syntax_error_names_line(write):
    path = write("bad.json", '[\n {"source": "a"},\n {"source": }\n]')
    assert error_of(read_rows, path) == [f"{path}:3: malformed JSON: Expecting value (column 13)"]


def test_bad_encoding_names_line_and_column(write):
    path = write("latin.jsonl", '{"source": "a", "target": "b"}\n{"source": "g\xfczel"}\n'.encode("latin-1"))
    assert error_of(read_rows, path) == [f"{path}:2: not valid UTF-8 (byte 0xfc at column 14); re-save the file "
                                         "as UTF-8"]


def test_csv_with_wrong_cell_count(write):
    path = write("bad.csv", "source,target\na,b\nc,d,e\n")
    assert error_of(read_rows, path) == [f"{path}:3: 3 cells but the header has 2 columns"]


def test_missing_column_lists_columns_present(write):
    write("t.jsonl", [{"en": "hello", "tr": "merhaba"}])
    recipe = recipe_for(write, '[data]\ntrain = "t.jsonl"\n')
    (msg,) = error_of(prepare_data, recipe)
    assert msg.endswith("t.jsonl: missing column 'source'; columns present: en, tr; map yours with "
                        'data.columns.source = "..."')
    mapped = recipe_for(write, '[data]\ntrain = "t.jsonl"\ncolumns = {source = "en", target = "tr"}\n')
    assert prepare_data(mapped).train[0].fields["source"] == "hello"


def test_row_missing_a_field_and_wrong_type(write):
    path = write("t.jsonl", [{"source": "a", "target": "b"}, {"source": "c"}, {"source": 42, "target": "d"}])
    recipe = recipe_for(write, '[data]\ntrain = "t.jsonl"\n')
    assert error_of(prepare_data, recipe) == [f"{path}:2: missing field 'target'",
                                              f"{path}:3: field 'source' should be text, got integer 42"]


def test_empty_fields_dropped_with_count_or_error(write):
    path = write("t.jsonl", PAIRS[:3] + [{"source": "  ", "target": "x"}, {"source": "y", "target": ""}])
    data = prepare_data(recipe_for(write, '[data]\ntrain = "t.jsonl"\n'))
    assert len(data.train) == 3
    assert data.report.empty_dropped == {"source": 1, "target": 1}
    assert "dropped 1 rows with an empty 'source' field" in data.report.warnings()
    strict = recipe_for(write, '[data]\ntrain = "t.jsonl"\non_empty = "error"\n')
    assert error_of(prepare_data, strict) == [f"{path}:4: empty field 'source' (set data.on_empty = \"drop\" to "
                                              "skip such rows)"]


def test_duplicates_counted_and_optionally_removed(write):
    write("t.jsonl", PAIRS + PAIRS[:3])
    data = prepare_data(recipe_for(write, '[data]\ntrain = "t.jsonl"\n'))
    assert len(data.train) == 13 and data.report.duplicates == {"train": 3}
    deduped = prepare_data(recipe_for(write, '[data]\ntrain = "t.jsonl"\ndedup = true\n'))
    assert len(deduped.train) == 10
    assert "3 exact duplicate rows in train, removed" in deduped.report.warnings()


def test_overlap_between_train_and_test_is_reported(write):
    write("t.jsonl", PAIRS)
    write("v.jsonl", PAIRS[:2] + [{"source": "new", "target": "yeni"}])
    data = prepare_data(recipe_for(write, '[data]\ntrain = "t.jsonl"\ntest = "v.jsonl"\n'))
    assert data.report.overlap == {"test": 2}
    assert "2 test rows have an input that also appears in train" in data.report.warnings()


def test_ratio_split_is_seeded_and_disjoint(write):
    write("t.jsonl", [{"source": f"s{i}", "target": f"t{i}"} for i in range(100)])
    body = '[data]\ntrain = "t.jsonl"\nvalid_ratio = 0.1\ntest_ratio = 0.2\nsplit_seed = 7\n'
    a, b = prepare_data(recipe_for(write, body)), prepare_data(recipe_for(write, body))
    assert (len(a.train), len(a.valid), len(a.test)) == (70, 10, 20)
    assert [r.fields for r in a.test] == [r.fields for r in b.test]
    sources = [{r.fields["source"] for r in split} for split in (a.train, a.valid, a.test)]
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
    other = prepare_data(recipe_for(write, body.replace("split_seed = 7", "split_seed = 8")))
    assert {r.fields["source"] for r in other.test} != sources[2]


def test_multitask_mixture_upsampling_and_temperature(write):
    write("sum.jsonl", [{"input": f"uzun haber metni {i}", "target": f"özet {i}"} for i in range(90)])
    write("qa.jsonl", [{"question": f"soru {i}", "context": "bağlam " * 20, "answer": f"cevap {i}"}
                       for i in range(10)] + [{"question": "q", "context": "kısa", "answer": "ab"}])
    base = """[data]
mixture = "{mixture}"
[[data.tasks]]
name = "summarize"
train = "sum.jsonl"
prefix = "summarize: "
[[data.tasks]]
name = "qa"
train = "qa.jsonl"
columns = {{target = "answer"}}
template = "answer: {{question}} context: {{context}}"
upsample = 2.0
min_target_chars = 3
min_input_chars = 50
"""
    data = prepare_data(recipe_for(write, base.format(mixture="proportional"), task="seq2seq"))
    assert data.report.filtered == {"target shorter than 3 characters": 1}
    assert data.report.rows["train"] == {"summarize": 90, "qa": 20}
    assert [m["drawn"] for m in data.report.mixture] == [90, 20]
    tempered = prepare_data(recipe_for(write, base.format(mixture="temperature"), task="seq2seq"))
    # shares ∝ rows^(1/2): 90^.5 : 20^.5 over the same 110 rows
    drawn = {m["task"]: m["drawn"] for m in tempered.report.mixture}
    assert drawn == {"summarize": round(110 * 90**0.5 / (90**0.5 + 20**0.5)),
                     "qa": round(110 * 20**0.5 / (90**0.5 + 20**0.5))}
    assert all(r.task in ("summarize", "qa") for r in tempered.train)


def test_embedding_formats_users_have(write):
    write("pairs.csv", "question,answer\nNe zaman?,Yarın.\nNerede?,Ankara'da.\n")
    write("negs.csv", "question,positive,negative1,negative2,negative3\nSoru?,Doğru.,Yanlış 1,,Yanlış 3\n")
    write("negs.jsonl", [{"question": "Soru?", "positive": "Doğru.", "negatives": ["Y1", " ", "Y2"]}])
    write("flag.jsonl", [{"query": "Soru?", "pos": "Doğru.", "neg": ["Y"]}])
    for name, negatives in (("pairs.csv", None), ("negs.csv", ["Yanlış 1", "Yanlış 3"]),
                            ("negs.jsonl", ["Y1", "Y2"]), ("flag.jsonl", ["Y"])):
        data = prepare_data(recipe_for(write, f'[data]\ntrain = "{name}"\n', task="embedding"))
        first = data.train[0].fields
        assert first["query"].endswith("?") and first["positive"].endswith(".") or first["positive"] == "Doğru."
        assert first.get("negatives") == negatives, name
    data = prepare_data(recipe_for(write, '[data]\ntrain = "negs.jsonl"\n', task="embedding"))
    assert data.report.empty_negatives == 1


def test_template_with_unknown_column(write):
    write("t.jsonl", PAIRS)
    recipe = recipe_for(write, '[data]\ntrain = "t.jsonl"\ntemplate = "Translate: {text}"\n')
    (msg,) = error_of(prepare_data, recipe)
    assert msg.endswith("t.jsonl: the template uses {text} but there is no such column; columns present: "
                        "source, target")


def test_unknown_suffix_and_missing_file(write, tmp_path):
    assert error_of(read_rows, write("a.xlsx", "x")) == [
        f"{tmp_path / 'a.xlsx'}: unknown data format .xlsx; expected one of .jsonl, .ndjson, .json, .csv, .tsv, "
        ".parquet, a datasets save_to_disk folder or a folder in hub layout"]
    assert error_of(read_rows, tmp_path / "nope.jsonl") == [f"{tmp_path / 'nope.jsonl'}: data file not found"]


def test_hub_dataset_offline_fails_fast_with_advice(write):
    recipe = recipe_for(write, '[data]\ndataset = "trmlx-test/does-not-exist"\ndataset_config = "en-tr"\n')
    (msg,) = error_of(prepare_data, recipe)
    assert msg == ("data.dataset 'trmlx-test/does-not-exist' (en-tr): cannot load split 'train': the hub is "
                   "unreachable and it is not in the local cache; download it while online or point data.train "
                   "at local files")
