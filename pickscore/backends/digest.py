"""The weights' digest each backend computes once at load (``Backend.weights_digest``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def sha256_of(chunks: Iterable[bytes | memoryview]) -> str:
    """Lowercase hex SHA-256 of the chunks in order, each hashed as it comes (never all of them held at once)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()
