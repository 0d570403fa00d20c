"""One text-to-image model's images for a prompt file, as ``evaluate-models`` compares them: a directory
``PATH/<prompt index>/<image>`` or a Parquet file (``prompt`` or ``prompt_index``, and ``image``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pickscore.datasets.prompts import Prompt
from pickscore.errors import InvalidInput

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass
class ImageSet:
    """One model's images: per prompt index, (label, image) pairs; an image is a path, bytes, or None (absent)."""

    name: str
    path: Path
    per_prompt: list[list[tuple[str, Callable[[], Path | bytes | None]]]] = field(default_factory=list)


def parse_image_set(text: str) -> tuple[str, Path]:
    """NAME=PATH, or PATH alone (named after its last component)."""
    name, sep, path = text.partition("=")
    if not sep:
        path = text
        name = Path(text.rstrip("/")).name
    if not name or not path:
        raise InvalidInput(f"--images {text!r}: expected NAME=PATH or PATH")
    return name, Path(path)


def load_image_set(name: str, path: Path, prompts: Sequence[Prompt]) -> ImageSet:
    """A directory PATH/<prompt index>/<image> or a Parquet file (prompt or prompt_index, image) -> its images
    per prompt. Every prompt must have images; InvalidInput names the model, the file or row, and the prompt."""
    if path.is_dir():
        return _directory_images(name, path, prompts)
    if path.is_file():
        return _parquet_images(name, path, prompts)
    raise InvalidInput(f"--images {name}: {path} does not exist (expected a directory or a Parquet file)")


def _directory_images(name: str, path: Path, prompts: Sequence[Prompt]) -> ImageSet:
    found: dict[int, Path] = {}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue  # hidden entries and loose files (a README) are not prompts
        if not entry.name.isdigit():
            raise InvalidInput(
                f"--images {name}: {entry} is not a prompt index: expected {path}/<prompt index>/<image>"
            )
        index = int(entry.name)
        if index >= len(prompts):
            raise InvalidInput(
                f"--images {name}: {entry}: prompt index {index}, but --prompts has {len(prompts)} prompts (0 to "
                f"{len(prompts) - 1})"
            )
        if index in found:
            raise InvalidInput(f"--images {name}: {entry} and {found[index]} are both prompt {index}")
        found[index] = entry
    _check_every_prompt(name, path, prompts, found, lambda p: f"{path}/{p.index} is missing")
    images = ImageSet(name, path)
    for prompt in prompts:
        folder = found[prompt.index]
        files = image_files(folder)
        if not files:
            raise InvalidInput(
                f"--images {name}: {folder} holds no image ({' '.join(IMAGE_EXTENSIONS)}) for prompt "
                f"{prompt.index} ({_quote(prompt.text)})"
            )
        images.per_prompt.append([(str(f), lambda f=f: f) for f in files])
    return images


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (any depth, by extension), sorted."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def _parquet_images(name: str, path: Path, prompts: Sequence[Prompt]) -> ImageSet:
    import pyarrow as pa  # not on every `pickscore` start: the command's parser reads this module
    import pyarrow.parquet as pq

    where = f"--images {name}: {path}"
    try:
        columns = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"{where}: not a directory nor a readable Parquet file ({e})") from None
    key = "prompt_index" if "prompt_index" in columns else "prompt" if "prompt" in columns else None
    if key is None or "image" not in columns:
        raise InvalidInput(f"{where}: needs columns prompt (or prompt_index) and image; it has {', '.join(columns)}")
    table = pq.read_table(path, columns=[key, "image"])
    image = table.column("image")
    if not (pa.types.is_binary(image.type) or pa.types.is_large_binary(image.type)):
        if not (pa.types.is_struct(image.type) and image.type.get_field_index("bytes") >= 0):
            raise InvalidInput(f"{where}: column image is {image.type}; expected encoded image bytes (binary)")
    rows = _rows_by_prompt(where, key, table.column(key).to_pylist(), prompts)
    _check_every_prompt(name, path, prompts, rows, lambda p: f"no row of {path} is for it")

    def fetch(row: int) -> bytes | None:
        value = image[row].as_py()
        return value.get("bytes") if isinstance(value, dict) else value

    images = ImageSet(name, path)
    for prompt in prompts:
        images.per_prompt.append([(f"{path} row {r}", lambda r=r: fetch(r)) for r in rows[prompt.index]])
    return images


def _rows_by_prompt(where: str, key: str, values: list[Any], prompts: Sequence[Prompt]) -> dict[int, list[int]]:
    """A Parquet image set's ``key`` column (prompt_index or prompt text) -> prompt index -> its rows."""
    by_text = {}
    for prompt in prompts:
        by_text.setdefault(prompt.text, prompt.index)  # a prompt listed twice: its rows go to the first
    rows: dict[int, list[int]] = {}
    for row, value in enumerate(values):
        if key == "prompt_index":
            if not isinstance(value, int) or not 0 <= value < len(prompts):
                raise InvalidInput(f"{where} row {row}: prompt_index {value!r} is not 0 to {len(prompts) - 1}")
            index = value
        else:
            index = by_text.get(value.strip() if isinstance(value, str) else value)
            if index is None:
                raise InvalidInput(f"{where} row {row}: prompt {_quote(value)} is not in --prompts")
        rows.setdefault(index, []).append(row)
    return rows


def _check_every_prompt(
    name: str, path: Path, prompts: Sequence[Prompt], found: Mapping[int, Any], why: Callable[[Prompt], str]
) -> None:
    missing = [p for p in prompts if p.index not in found]
    if missing:
        listed = "; ".join(f"prompt {p.index} ({_quote(p.text)}): {why(p)}" for p in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise InvalidInput(f"--images {name}: no images for {len(missing)} of {len(prompts)} prompts: {listed}{more}")


def _quote(text: Any) -> str:
    text = str(text)
    return repr(text if len(text) <= 60 else text[:57] + "...")
