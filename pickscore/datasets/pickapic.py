"""Pick-a-Pic parquet: the schema and splits, and its preference pairs, found and streamed.

    pairs = iter_pairs("pickapic_v1", split="validation_unique", labeled_only=True)

Files are read one record batch at a time and only the columns a pair needs, so a split of hundreds of gigabytes
streams in the memory of one batch. A batch job reads the same files as candidates (``parquet``: two a row).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

Source = str | os.PathLike

SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")

# The Pick-a-Pic parquet schema, types as published on the Hugging Face hub (which also has image_0_url,
# image_1_url and a pandas index column, unused here); the synthetic generator writes exactly this.
SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),  # encoded image bytes, whatever the format
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),  # 1/0 for a choice, 0.5/0.5 for a tie, 0/0 when nobody judged
        ("label_1", pa.float64()),
        ("has_label", pa.bool_()),
        ("are_different", pa.bool_()),
        ("num_example_per_prompt", pa.int64()),  # rows with this caption in the split; the loss weighs by 1/n
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("best_image_uid", pa.string()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("user_id", pa.int64()),
        ("ranking_id", pa.int64()),
        ("created_at", pa.timestamp("ns")),
    ]
)
REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
CANDIDATE_COLUMNS = ("caption", *IMAGE_COLUMNS)  # what makes a file Pick-a-Pic's as a batch job's input
# Value a row gets where its file lacks the column or the cell is null.
OPTIONAL_DEFAULTS = {"has_label": True, "num_example_per_prompt": 1}
DEFAULT_BATCH_ROWS = 256


@dataclass(frozen=True)
class PreferencePair:
    """One judged pair: a prompt, two encoded images and the soft preference target.

    ``file`` and ``row`` say where the pair was read from, so a skipped row can be found again;
    they take no part in equality.
    """

    caption: str
    image_0: bytes = field(repr=False)
    image_1: bytes = field(repr=False)
    label_0: float
    label_1: float
    num_example_per_prompt: int
    file: str = field(default="", compare=False)
    row: int = field(default=-1, compare=False)

    @property
    def origin(self) -> str:
        """``part-00000.parquet row 17``, or empty when the pair was not read from a file."""
        return f"{Path(self.file).name} row {self.row}" if self.file else ""


def is_pickapic(names: Sequence[str]) -> bool:
    """Whether a batch job's Parquet input with these columns is Pick-a-Pic's layout (two candidates a row):
    it has caption, jpg_0 and jpg_1 and not our own prompt column."""
    return set(CANDIDATE_COLUMNS) <= set(names) and "prompt" not in names


def find_split_files(root: Source, split: str | None = None) -> list[Path]:
    """Sorted parquet files to read.

    With ``split``, ``root`` is a dataset directory holding the split as ``root/<split>/*.parquet``,
    ``root/<split>-*.parquet`` or ``root/data/<split>-*.parquet`` (Hugging Face); the first layout
    found wins. Without, ``root`` is one parquet file, a directory of them, or a glob pattern.
    Raises FileNotFoundError saying what was looked for.
    """
    if split is None:
        return _source_files(str(root))
    if not Path(root).is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist")
    patterns = _split_patterns(Path(root), split)
    for pattern in patterns:
        if files := _glob(pattern):
            return files
    present = [s for s in SPLITS if any(_glob(p) for p in _split_patterns(Path(root), s))]
    found = f"splits found there: {', '.join(present)}" if present else "no Pick-a-Pic split found there"
    raise FileNotFoundError(f"no parquet files for split {split!r}: looked for {', '.join(patterns)}; {found}")


def iter_pairs(
    source: Source, split: str | None = None, labeled_only: bool = False, batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[PreferencePair]:
    """Stream the pairs of ``find_split_files(source, split)``, in file and row order.

    ``labeled_only`` drops rows nobody judged (``has_label`` false, or both labels 0), as evaluation
    needs. Reads ``batch_rows`` rows at a time. Raises ValueError for a file that is not Pick-a-Pic parquet.
    """
    for path in find_split_files(source, split):
        row = 0
        for columns in _read_batches(path, batch_rows):
            yield from _pairs(columns, str(path), row, labeled_only)
            row += len(columns["caption"])


def has_pairs(source: Source, split: str | None = None, labeled_only: bool = False) -> bool:
    """Whether ``iter_pairs(source, split, labeled_only)`` would yield a pair, reading no image column.

    Raises as ``iter_pairs`` does for a missing split or a file that is not Pick-a-Pic parquet.
    """
    for path in find_split_files(source, split):
        for columns in _read_batches(path, DEFAULT_BATCH_ROWS, images=False):
            if any(not labeled_only or _labeled(columns, i) for i in range(len(columns["caption"]))):
                return True
    return False


def _read_batches(path: Path, batch_rows: int, images: bool = True) -> Iterator[dict[str, list[Any]]]:
    """Column name -> values, ``batch_rows`` rows at a time, for the columns a pair needs (without jpg_0 and
    jpg_1 unless ``images``). Raises ValueError for a file that is not Pick-a-Pic parquet."""
    try:
        # pre_buffer would fetch every row group of the file up front: the whole file in memory.
        parquet = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from e
    with parquet:
        names = set(parquet.schema_arrow.names)
        if missing := [c for c in REQUIRED_COLUMNS if c not in names]:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; Pick-a-Pic files have {', '.join(SCHEMA.names)}"
            )
        columns = [
            c for c in (*REQUIRED_COLUMNS, *OPTIONAL_DEFAULTS) if c in names and (images or c not in IMAGE_COLUMNS)
        ]
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            yield batch.to_pydict()


def _labeled(columns: dict[str, list[Any]], i: int) -> bool:
    """Row ``i`` was judged: ``has_label`` (true when absent) and some label above 0."""
    judged = _label(columns, "label_0", i) + _label(columns, "label_1", i) > 0
    return bool(_optional(columns, "has_label", i)) and judged


def _split_patterns(root: Path, split: str) -> list[str]:
    base = glob.escape(str(root))
    return [f"{base}/{split}/*.parquet", f"{base}/{split}-*.parquet", f"{base}/data/{split}-*.parquet"]


def _glob(pattern: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def _source_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        if files := _glob(glob.escape(source) + "/*.parquet"):
            return files
        raise FileNotFoundError(
            f"no *.parquet files in {source}; for a dataset directory, give a split ({', '.join(SPLITS)})"
        )
    if any(c in source for c in "*?["):
        if files := _glob(source):
            return files
        raise FileNotFoundError(f"no files match {source}")
    raise FileNotFoundError(f"{source}: no such file or directory")


def _pairs(columns: dict[str, list[Any]], file: str, first_row: int, labeled_only: bool) -> Iterator[PreferencePair]:
    for i, caption in enumerate(columns["caption"]):
        if labeled_only and not _labeled(columns, i):
            continue
        yield PreferencePair(
            caption=caption or "",
            image_0=columns["jpg_0"][i] or b"",  # a null image fails decoding as "empty file"
            image_1=columns["jpg_1"][i] or b"",
            label_0=_label(columns, "label_0", i),
            label_1=_label(columns, "label_1", i),
            num_example_per_prompt=int(_optional(columns, "num_example_per_prompt", i)),
            file=file,
            row=first_row + i,
        )


def _label(columns: dict[str, list[Any]], name: str, i: int) -> float:
    return float(columns[name][i] or 0.0)  # null: nobody judged


def _optional(columns: dict[str, list[Any]], name: str, i: int) -> Any:
    value = columns[name][i] if name in columns else None
    return OPTIONAL_DEFAULTS[name] if value is None else value
