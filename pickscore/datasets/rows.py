"""A candidate to score: one (prompt, image) row of an input, and where it was read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One candidate: its place in the job, the caller's id, its group and prompt, and the image (bytes or a path);
    ``error`` when the row itself is unusable (the reason: it is reported, not scored); ``model`` from an optional
    column; ``file`` and ``position``, where the row is in its input (the Parquet row, both candidates of a
    Pick-a-Pic row sharing it; the WebDataset sample; the manifest.jsonl line, blank lines counted; from 0)."""

    index: int
    id: str
    group: str
    prompt: str
    image: bytes | None = None
    path: str | None = None
    error: str = ""
    model: str = ""  # the generator that made the image, when the input says (the collection app's pools)
    file: str = ""
    position: int = -1


def make_row(
    ident: str,
    group: str | None,
    prompt: Any,
    image: bytes | None,
    path: str | None,
    at: tuple[Path, int],
    model: Any = None,
) -> Row:
    """A read row, ``at`` (file, position) in its input; its ``error`` says what makes it unusable, if anything.
    Its ``index`` is set by the reader of the whole job (``inputs.read_rows``)."""
    prompt = prompt if isinstance(prompt, str) else ""
    row = Row(0, ident, "" if group is None else group, prompt, image, path, model=str(model or ""))
    row.file, row.position = str(at[0]), at[1]
    if not row.prompt.strip():
        row.error = "no prompt"
    elif not image and not path:
        row.error = "no image (neither image bytes nor image_path)"
    if not row.group:
        row.group = row.prompt  # one group per prompt
    return row


def unusable_row(ident: str, error: str, path: Path, position: int) -> Row:
    """A row that could not be read at all (``error``, the reason), named by ``ident`` and its place."""
    return Row(0, ident, ident, "", error=error, file=str(path), position=position)
