"""Read rows from the file formats users have (JSONL, JSON array, CSV/TSV, Parquet, `save_to_disk` folders) or
from the hub, each row tagged with where it came from so every later error can name file and line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trmlx.errors import UserError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
_MAX_ERRORS = 20  # report this many bad rows at once, then a count of the rest


@dataclass(frozen=True)
class Row:
    """One raw row and its origin, e.g. 'data/train.jsonl:12'."""

    values: dict[str, Any]
    origin: str


def read_rows(path: str | Path, split: str = "train") -> list[Row]:
    """Read every row of one file or `save_to_disk` folder; raise UserError naming file and line on bad input."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: data file not found")
    if path.is_dir():
        return _read_saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in SUFFIXES:
        raise UserError(f"{path}: unknown data format {suffix or '(no suffix)'}; expected one of "
                        f"{', '.join(SUFFIXES)} or a datasets save_to_disk folder")
    text = _decode(path)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, text)
    if suffix == ".json":
        return _read_json(path, text)
    return _read_csv(path, text, "\t" if suffix == ".tsv" else ",")


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


def _read_saved_dataset(path: Path, split: str) -> list[Row]:
    if not any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise UserError(f"{path}: a folder must be a datasets save_to_disk folder (no dataset_info.json or "
                        "dataset_dict.json found)")
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise UserError(f"{path}: no split {split!r}; splits present: {', '.join(dataset)}")
        dataset = dataset[split]
    return [Row(v, f"{path}[{split}]: row {i + 1}") for i, v in enumerate(dataset)]


def read_hub_rows(name: str, config: str, split: str) -> list[Row]:
    """Rows of a hub dataset: from the local cache when offline, with a clear error instead of a hang."""
    label = f"data.dataset {name!r}" + (f" ({config})" if config else "")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if not offline and not _hub_reachable():
        offline = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # make datasets use the cache instead of retrying the network
    if offline:
        _declare_offline()
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, config or None, split=split)
    except Exception as err:  # datasets raises many types; the user needs the same advice for all of them
        reason = "the hub is unreachable and it is not in the local cache" if offline else str(err).splitlines()[0]
        raise UserError(f"{label}: cannot load split {split!r}: {reason}; download it while online or point "
                        "data.train at local files") from None
    return [Row(v, f"{name}[{split}]: row {i + 1}") for i, v in enumerate(dataset)]


def _declare_offline() -> None:
    """huggingface_hub and datasets read HF_HUB_OFFLINE once, when imported: if they were imported before it was set
    (transformers imports them), set what they read too, or load_dataset retries the network for ~23 s."""
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _raise_all(errors: list[str]) -> None:
    if errors:
        extra = [f"... and {len(errors) - _MAX_ERRORS} more bad rows"] if len(errors) > _MAX_ERRORS else []
        raise UserError(errors[:_MAX_ERRORS] + extra)
