"""The closed set of domain errors.

Every layer raises these; each transport (CLI exit codes, gRPC status codes)
maps them exactly once. Messages name the item and the reason, e.g.
``image 3 (cat.png): not a decodable image (cannot identify image file)``.
"""

from __future__ import annotations

import os
import re

# How a message names its item: "image 3 (id 'x'): ", after "server: CODE: " or "server: HTTP 400: ".
_ITEM_PREFIX = re.compile(r"^((?:server: (?:[A-Z_]+: |HTTP \d+: )?)?)image \d+(?: \(.*?\))?: ")


class PickScoreError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInput(PickScoreError):
    """The caller sent something unusable: a bad image, an empty request, a bad tensor."""


class TooLarge(InvalidInput):
    """A request body over what the server reads (``--max-message-bytes``, after decompression): HTTP 413 (over
    gRPC, the channel's own limit answers first)."""


class Overloaded(PickScoreError):
    """Refused before any work: the queue is full, or would not be reached in time; retry later.

    ``retry_after_s``: the server's estimate of when a retry could be admitted, when it has one.
    """

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(PickScoreError):
    """The deadline passed before the work was computed."""


class Unavailable(PickScoreError):
    """Not ready yet, or draining."""


class NotFound(PickScoreError):
    """Unknown model name or model reference."""


class Unauthenticated(PickScoreError):
    """Missing or wrong credentials."""


class Forbidden(PickScoreError):
    """Known caller, but not allowed to do this (not an admin, no consent, a forged form)."""


class Conflict(PickScoreError):
    """The request no longer fits the current state: a choice already made, a pair no longer shown."""


class Internal(PickScoreError):
    """A backend failure."""


class ModelLoadError(PickScoreError):
    """A model reference could not be resolved or its files could not be loaded."""


def describe_item(index: int, item: object) -> str:
    """How errors name an item: ``image 3 (photos/cat.png)`` for a file, ``image 3`` for bytes or pixels."""
    return f"image {index} ({item})" if isinstance(item, str | os.PathLike) else f"image {index}"


def item_reason(error: Exception | str) -> str:
    """A message naming its item (``image 3 (id 'x'): reason``, perhaps after ``server: CODE: ``) -> the reason."""
    return _ITEM_PREFIX.sub("", str(error), count=1)


def item_renamed(error: Exception | str, name: str) -> str:
    """A message naming its item, with the item named ``name`` instead (what came before it is kept)."""
    return _ITEM_PREFIX.sub(lambda m: f"{m[1]}{name}: ", str(error), count=1)
