"""Parquet candidates: columns ``prompt`` and ``image`` (encoded bytes) or ``image_path`` (relative to the
file), optional ``group``, ``id`` and ``model``; or Pick-a-Pic's layout, two candidates a row."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pickscore.datasets.pickapic import CANDIDATE_COLUMNS, is_pickapic
from pickscore.datasets.rows import Row, make_row
from pickscore.errors import InvalidInput

# The columns read, where the file has them.
COLUMNS = (
    *("prompt", "image", "image_path", "group", "id", "model"),
    *(*CANDIDATE_COLUMNS, "ranking_id", "model_0", "model_1"),
)


def parquet_count(path: Path) -> int:
    """The candidates of one file, from its metadata."""
    source = pq.ParquetFile(path)
    rows = source.metadata.num_rows
    return 2 * rows if is_pickapic(source.schema_arrow.names) else rows


def parquet_rows(path: Path) -> Iterator[Row]:
    """One file's candidates in order, read 64 rows at a time."""
    source = pq.ParquetFile(path)
    names = set(source.schema_arrow.names)
    pickapic = is_pickapic(source.schema_arrow.names)
    if not pickapic and ("prompt" not in names or not names & {"image", "image_path"}):
        raise InvalidInput(
            f"{path}: needs a column prompt and one of image (bytes) or image_path (or Pick-a-Pic's "
            f"caption, jpg_0, jpg_1); it has {', '.join(sorted(names))}"
        )
    at = 0
    for batch in source.iter_batches(batch_size=64, columns=[c for c in COLUMNS if c in names]):
        for record in batch.to_pylist():
            yield from (_pair_rows if pickapic else _record_rows)(record, path, at)
            at += 1


def _pair_rows(record: dict[str, Any], path: Path, at: int) -> Iterator[Row]:
    """A Pick-a-Pic row's two candidates, one group (its ranking_id, else its place)."""
    key = str(record["ranking_id"]) if record.get("ranking_id") is not None else f"{path.name}:{at}"
    for side in (0, 1):
        image = record[f"jpg_{side}"]
        yield make_row(f"{key}:{side}", key, record["caption"], image, None, (path, at), record.get(f"model_{side}"))


def _record_rows(record: dict[str, Any], path: Path, at: int) -> Iterator[Row]:
    group, ident, image_path = record.get("group"), record.get("id"), record.get("image_path")
    if image_path is not None and not os.path.isabs(image_path):
        image_path = str(path.parent / image_path)
    yield make_row(
        f"{path.name}:{at}" if ident is None else str(ident),
        None if group is None else str(group),
        record["prompt"],
        record.get("image"),
        image_path,
        (path, at),
        record.get("model"),
    )
