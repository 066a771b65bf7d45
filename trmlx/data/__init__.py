"""Data: read files (readers), check and mix rows (prepare), turn them into token ids and batches (examples)."""

from trmlx.data.prepare import DataReport, PreparedData, Record, prepare_data
from trmlx.data.readers import Row, read_rows

__all__ = ["DataReport", "PreparedData", "Record", "Row", "prepare_data", "read_rows"]
