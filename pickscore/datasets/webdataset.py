"""WebDataset tar shards: a sample is ``KEY.jpg|jpeg|png|webp`` with ``KEY.txt`` (the prompt) or ``KEY.json``
(``prompt`` or ``caption``, optional ``group``)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from pickscore.datasets.rows import Row, make_row, unusable_row

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def webdataset_rows(path: Path) -> Iterator[Row]:
    """One shard's samples in order, streamed: one sample's files in memory at a time."""
    with tarfile.open(path, "r|*") as tar:
        key, parts, position = None, {}, 0
        for member in tar:
            if not member.isfile():
                continue
            stem, dot, suffix = member.name.rpartition(".")
            if not dot:
                continue
            if stem != key and key is not None:
                yield _sample(path, key, parts, position)
                parts, position = {}, position + 1
            key = stem
            data = tar.extractfile(member)
            parts["." + suffix.lower()] = data.read() if data else b""
        if key is not None:
            yield _sample(path, key, parts, position)


def _sample(path: Path, key: str, parts: dict[str, bytes], position: int) -> Row:
    image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
    prompt, group = "", None
    if ".json" in parts:
        try:
            meta = json.loads(parts[".json"])
            prompt = meta.get("prompt") or meta.get("caption") or ""
            group = None if meta.get("group") is None else str(meta["group"])
        except (ValueError, AttributeError) as e:
            return unusable_row(key, f".json is not a JSON object ({e})", path, position)
    elif ".txt" in parts:
        prompt = parts[".txt"].decode("utf-8", "replace").strip()
    return make_row(key, group, prompt, image, None, (path, position))
