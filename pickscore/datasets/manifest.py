"""A directory's ``manifest.jsonl``: ``{"image": path relative to it, "prompt": ..., "group"?: ..., "id"?: ...,
"model"?: ...}`` a line."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from pickscore.datasets.rows import Row, make_row, unusable_row

MANIFEST = "manifest.jsonl"


def manifest_count(path: Path) -> int:
    """The candidates of one manifest: its non-blank lines."""
    return sum(1 for line in path.open() if line.strip())


def manifest_rows(path: Path) -> Iterator[Row]:
    """One manifest's candidates in order; a line that is not a JSON object with an image is an unusable row."""
    for position, line in enumerate(path.open(encoding="utf-8")):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            image = entry["image"]
        except (ValueError, KeyError, TypeError) as e:
            where = f"{path}:{position + 1}"  # as an editor shows the line
            yield unusable_row(where, f"not a JSON object with an image ({e})", path, position)
            continue
        group = entry.get("group")
        yield make_row(
            str(entry.get("id", image)),
            None if group is None else str(group),
            entry.get("prompt"),
            None,
            image if os.path.isabs(image) else str(path.parent / image),
            (path, position),
            entry.get("model"),
        )
