"""A prompt file, as ``evaluate-models`` and the collection app's pools read it: one prompt a line, or JSONL."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pickscore.errors import InvalidInput

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str
    id: str | None = None


def read_prompts(path: str | Path) -> list[Prompt]:
    """One prompt a line, or JSONL ({"prompt": ..., "id"?: ...}) for a .jsonl/.ndjson file; the position is the
    prompt's index. Trailing blank lines are allowed; a blank line elsewhere, a bad record, a repeated id is not."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InvalidInput(f"--prompts {path}: not UTF-8 text ({e})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise InvalidInput(f"--prompts {path}: no prompts")
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    prompts, ids = [], set()
    for number, line in enumerate(lines, 1):
        where = f"--prompts {path} line {number}"
        if not line.strip():
            raise InvalidInput(f"{where}: empty (every line is one prompt; its index is its line number - 1)")
        if not jsonl:
            prompts.append(Prompt(len(prompts), line.strip()))
            continue
        prompt = _record(line, where)
        if prompt.id is not None and prompt.id in ids:
            raise InvalidInput(f"{where}: id {prompt.id!r} repeats an earlier line's")
        ids.add(prompt.id)
        prompts.append(Prompt(len(prompts), prompt.text, prompt.id))
    return prompts


def _record(line: str, where: str) -> Prompt:
    """One JSONL line -> its prompt (index not yet set)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{where}: not JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise InvalidInput(f'{where}: expected {{"prompt": "non-empty text", "id": optional}}')
    return Prompt(-1, record["prompt"].strip(), None if record.get("id") is None else str(record["id"]))
