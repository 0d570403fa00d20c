"""A batch job's inputs: files, directories and globs -> their files in a fixed order -> numbered rows.

Parquet (``parquet``), WebDataset tar shards (``webdataset``) and directories holding manifest.jsonl
(``manifest``).
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path

from pickscore.datasets.manifest import MANIFEST, manifest_count, manifest_rows
from pickscore.datasets.parquet import parquet_count, parquet_rows
from pickscore.datasets.rows import Row
from pickscore.datasets.webdataset import webdataset_rows
from pickscore.errors import InvalidInput


def input_files(inputs: Sequence[str]) -> list[Path]:
    """Every file the inputs name, in a fixed order: globs expanded, directories listed (a directory with
    manifest.jsonl is one input)."""
    out: list[Path] = []
    for spec in inputs:
        matches = sorted(glob.glob(spec)) or [spec]
        for match in matches:
            path = Path(match)
            if path.is_dir():
                if (path / MANIFEST).exists():
                    out.append(path / MANIFEST)
                else:
                    out.extend(sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".tar")))
            elif path.exists():
                out.append(path)
            else:
                raise InvalidInput(f"--input {spec}: no such file or directory")
    if not out:
        raise InvalidInput(f"--input {' '.join(inputs)}: no Parquet, WebDataset (.tar) or manifest.jsonl found")
    return out


def file_rows(path: Path) -> Iterator[Row]:
    """One input file's rows, in order (their ``index`` not yet set)."""
    if path.suffix == ".parquet":
        return parquet_rows(path)
    if path.suffix == ".tar":
        return webdataset_rows(path)
    if path.name == MANIFEST:
        return manifest_rows(path)
    raise InvalidInput(f"{path}: not Parquet, a WebDataset .tar or a manifest.jsonl")


def read_rows(files: Sequence[Path]) -> Iterator[Row]:
    """Every row of ``files`` (``input_files``), numbered in order."""
    index = 0
    for path in files:
        for row in file_rows(path):
            row.index = index
            index += 1
            yield row


def file_count(path: Path) -> int | None:
    """The rows of one input file when that is cheap to know (Parquet metadata, manifest lines), else None."""
    if path.suffix == ".parquet":
        return parquet_count(path)
    if path.name == MANIFEST:
        return manifest_count(path)
    return None


def count_rows(files: Sequence[Path]) -> int | None:
    """All the rows ``files`` hold when every file's count is cheap to know, else None."""
    counts = [file_count(path) for path in files]
    return None if None in counts else sum(counts)
