"""Read rows from the file formats users have (JSONL, JSON array, CSV/TSV, Parquet, `save_to_disk` folders and
folders in hub layout), each row tagged with where it came from so every later error can name file and line.
A file without rows is an error: an empty training or test file is a mistake, not an empty split.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from trmlx.data.fields import Row  # noqa: F401  (readers return Rows; callers import it from here too)
from trmlx.errors import UserError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
_EXPECTED = {".jsonl": "one JSON object per line", ".ndjson": "one JSON object per line",
             ".json": "a JSON array of objects", ".csv": "a header row and at least one data row",
             ".tsv": "a header row and at least one data row", ".parquet": "at least one row"}
_MAX_ERRORS = 20  # report this many bad rows at once, then a count of the rest


def read_rows(path: str | Path, split: str = "train") -> list[Row]:
    """Read every row of one file, or one split of a dataset folder; raise UserError naming file and line on bad
    input, and on a file without rows."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: data file not found")
    if path.is_dir():
        from trmlx.data.hub import read_folder_split

        rows = read_folder_split(path, split)
        if not rows:
            raise UserError(f"{path}[{split}]: no rows; the split is empty")
        return rows
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{path}: unknown data format {suffix or '(no suffix)'}; expected one of "
                        f"{', '.join(SUFFIXES)}, a datasets save_to_disk folder or a folder in hub layout")
    if suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        text = _decode(path)
        if not text.strip():
            raise UserError(f"{path}: empty file; expected {_EXPECTED[suffix]}")
        if suffix in (".jsonl", ".ndjson"):
            rows = _read_jsonl(path, text)
        elif suffix == ".json":
            rows = _read_json(path, text)
        else:
            rows = _read_csv(path, text, "\t" if suffix == ".tsv" else ",")
    if not rows:
        what = "only a header row" if suffix in (".csv", ".tsv") else "no rows"
        raise UserError(f"{path}: {what}; expected {_EXPECTED[suffix]}")
    return rows


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column "
                        f"{err.start - line_start + 1}); re-save the file as UTF-8") from None


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows, errors = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append(f"{path}:{number}: malformed JSON: {err.msg} (column {err.colno})")
            continue
        if not isinstance(value, dict):
            errors.append(f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}")
            continue
        rows.append(Row(value, f"{path}:{number}"))
    _raise_all(errors)
    return rows


def _read_json(path: Path, text: str) -> list[Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]} as written by many exporters
    if not isinstance(value, list):
        raise UserError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")
    errors = [f"{path}: item {i + 1}: expected an object, got {type(v).__name__}"
              for i, v in enumerate(value) if not isinstance(v, dict)]
    _raise_all(errors)
    return [Row(v, f"{path}: item {i + 1}") for i, v in enumerate(value)]


def _read_csv(path: Path, text: str, delimiter: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    if not header:
        raise UserError(f"{path}: empty file; expected a header row")
    blank = [i + 1 for i, name in enumerate(header) if not name.strip()]
    if blank:
        raise UserError(f"{path}:1: header has an empty column name at position {blank[0]}")
    twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
    if twice is not None:  # DictReader would keep only the last column of that name, silently
        positions = [str(i + 1) for i, name in enumerate(header) if name == twice]
        raise UserError(f"{path}:1: column {twice!r} appears twice in the header (positions "
                        f"{' and '.join(positions)}); rename one")
    rows, errors = [], []
    try:
        for record in reader:
            if None in record:  # more cells than header columns
                errors.append(f"{path}:{reader.line_num}: {len(header) + len(record[None])} cells but the header "
                              f"has {len(header)} columns")
                continue
            missing = [k for k, v in record.items() if v is None]
            if missing:
                errors.append(f"{path}:{reader.line_num}: {len(header) - len(missing)} cells but the header has "
                              f"{len(header)} columns")
                continue
            rows.append(Row(dict(record), f"{path}:{reader.line_num}"))
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None
    _raise_all(errors)
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: cannot read Parquet: {err}") from None
    return [Row(v, f"{path}: row {i + 1}") for i, v in enumerate(table.to_pylist())]


def _raise_all(errors: list[str]) -> None:
    if errors:
        extra = [f"... and {len(errors) - _MAX_ERRORS} more bad rows"] if len(errors) > _MAX_ERRORS else []
        raise UserError(errors[:_MAX_ERRORS] + extra)
