"""The ONNX export's manifest: what makes a directory an export, and what it records.

An export (``pickscore export onnx``) is a directory with ``image.onnx``, ``text.onnx``, the preprocessing and
tokenizer files, and ``pickscore_onnx.json``: ``{"format": "pickscore-onnx", "version": 1, "precision",
"source", "logit_scale", "embed_dim", "context_length", "model_cfg", "verification"}``. The exporter writes
it; the onnxruntime backend reads it. ``source`` is the checkpoint the export came from: a served export is
named by its own directory, with its precision in its description (``CPU int8``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pickscore.errors import ModelLoadError

MANIFEST = "pickscore_onnx.json"
FORMAT = "pickscore-onnx"
PRECISIONS = ("fp32", "fp16", "int8")


def is_export(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export; ModelLoadError when it is missing, unreadable or not ours."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model {directory}: unreadable {MANIFEST}: {e}") from e
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"model {directory}: {MANIFEST} is not a pickscore ONNX export manifest")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
