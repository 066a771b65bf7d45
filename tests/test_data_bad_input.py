"""Bad data through the real CLI: `trmlx check` exits with code 2 and one line naming the file (and the line, key
or numbers), never a traceback. One case per test id, numbered."""

from __future__ import annotations

import json

import pytest

PAIRS = [{"source": f"sentence {i}", "target": f"cümle {i}"} for i in range(60)]
QA = [{"question": f"q{i}", "context": f"c{i}", "answer": f"a{i}"} for i in range(60)]
SEQ2SEQ_QA = 'columns = { target = "answer" }\ntemplate = "{question} | {context}"\n'


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def without(rows: list[dict], index: int, key: str) -> list[dict]:
    rows = [dict(r) for r in rows]
    del rows[index][key]
    return rows


def with_value(rows: list[dict], index: int, key: str, value) -> list[dict]:
    rows = [dict(r) for r in rows]
    rows[index][key] = value
    return rows


NESTED = [{"translation": {"en": f"e{i}", "tr": f"t{i}"}} for i in range(60)]
NESTED[55] = {"translation": {"en": "e55"}}

# (id, task, data file name, its content, extra [data] lines, expected error after "error: ")
CASES = [
    ("empty-jsonl", "causal", "t.jsonl", "", "", "{file}: empty file; expected one JSON object per line"),
    ("blank-lines-jsonl", "causal", "t.jsonl", "\n \n", "", "{file}: empty file; expected one JSON object per line"),
    ("empty-csv", "causal", "t.csv", "", "", "{file}: empty file; expected a header row and at least one data row"),
    ("header-only-csv", "causal", "t.csv", "source,target\n", "",
     "{file}: only a header row; expected a header row and at least one data row"),
    ("empty-json-array", "causal", "t.json", "[]", "", "{file}: no rows; expected a JSON array of objects"),
    ("duplicate-csv-header", "causal", "t.csv", "source,target,source\na,b,c\n", "",
     "{file}:1: column 'source' appears twice in the header (positions 1 and 3); rename one"),
    ("template-empty-braces", "causal", "t.jsonl", jsonl(PAIRS[:3]), 'template = "Translate: {}"\n',
     "{recipe}: data.template: placeholder {} names no column; write {column} (e.g. {source}), and literal "
     "braces as {{ and }}"),
    ("template-positional", "causal", "t.jsonl", jsonl(PAIRS[:3]), 'template = "Translate: {0}"\n',
     "{recipe}: data.template: placeholder {0} names no column; write {column} (e.g. {source}), and literal "
     "braces as {{ and }}"),
    ("column-missing-late-row", "causal", "t.jsonl", jsonl(without(PAIRS, 57, "target")), "",
     "{file}:58: missing field 'target'"),
    ("template-field-missing-late-row", "seq2seq", "t.jsonl", jsonl(without(QA, 54, "context")), SEQ2SEQ_QA,
     "{file}:55: missing field 'context' (used by the template)"),
    ("nested-field-missing-late-row", "causal", "t.jsonl", jsonl(NESTED),
     'columns = { source = "translation.en", target = "translation.tr" }\n',
     "{file}:56: missing field 'translation.tr' (the target role)"),
    ("null-template-field", "seq2seq", "t.jsonl", jsonl(with_value(QA, 52, "context", None)),
     SEQ2SEQ_QA + 'on_empty = "error"\n',
     "{file}:53: empty field 'context' (set data.on_empty = \"drop\" to skip such rows)"),
    ("list-target-of-numbers", "causal", "t.jsonl", jsonl(with_value(PAIRS, 3, "target", [1, 2])), "",
     "{file}:4: field 'target' should be text or a list of texts, got list [1, 2]"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i + 1:02d}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_data_is_one_line_exit_2(case, cli, write):
    _, task, name, content, extra, expected = case
    data = write(name, content)
    recipe = write("r.toml", f'task = "{task}"\n[model]\npath = "m"\n[data]\ntrain = "{name}"\n{extra}')
    result = cli("check", str(recipe), "--no-tokenizer")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == ["error: " + expected.replace("{file}", str(data)).replace("{recipe}",
                                                                                         str(recipe))]
    assert "Traceback" not in result.output


def test_case14_empty_parquet_file(cli, write, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"source": pa.array([], pa.string()), "target": pa.array([], pa.string())}),
                   tmp_path / "t.parquet")
    recipe = write("r.toml", '[model]\npath = "m"\n[data]\ntrain = "t.parquet"\n')
    result = cli("check", str(recipe), "--no-tokenizer")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {tmp_path / 't.parquet'}: no rows; expected at least one row"]


LONG = "bir iki üç dört beş altı yedi sekiz dokuz on"  # 10 words of the tiny tokenizer: 11 tokens with <s>


@pytest.mark.parametrize("too_long, expected", [
    ("truncate", "data.max_length = 8: none of the 3 train rows fits: the shortest prompt is 11 tokens, which "
                 "leaves no room for the target; raise data.max_length above 11 (the shortest prompt + target is "
                 "13)"),
    ("drop", "data.max_length = 8: none of the 3 train rows fits: the shortest prompt + target is 13 tokens; "
             "raise data.max_length to at least 13 or set data.too_long = \"truncate\""),
], ids=["case15-max-length-truncate", "case16-max-length-drop"])
def test_max_length_that_fits_nothing_gives_the_numbers(too_long, expected, cli, write, tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    write("t.jsonl", [{"source": LONG, "target": f"merhaba{s}"} for s in ("", " dünya", " dünya world")])
    recipe = write("r.toml", f'[model]\npath = "tok"\n[data]\ntrain = "t.jsonl"\nmax_length = 8\n'
                             f'too_long = "{too_long}"\n')
    result = cli("check", str(recipe))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == ["error: " + expected]
