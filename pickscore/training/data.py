"""Pick-a-Pic preference pairs decoded into pixels, for training and evaluation (reading them:
``pickscore.datasets.pickapic``).

    pairs = iter_pairs("pickapic_v1", split="validation_unique", labeled_only=True)
    skipped = SkipCounter("validation_unique")
    for pair, pixels_0, pixels_1 in iter_decoded(pairs, preprocess_cfg, skipped):
        ...  # pixels_*: float32 (3, H, W)
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from pickscore.datasets.pickapic import SCHEMA as SCHEMA  # documented as training.data.SCHEMA (docs/DESIGN.md)
from pickscore.datasets.pickapic import PreferencePair
from pickscore.errors import InvalidInput
from pickscore.model.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig, load_pixels

log = logging.getLogger(__name__)


def decode_pair(
    pair: PreferencePair, preprocess_cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray]:
    """A pair's two images -> (pixels_0, pixels_1), float32 (3, H, W) each.

    Raises InvalidInput naming the column of the bad image (``jpg_1: not a decodable image ...``).
    """
    return _pixels(pair.image_0, "jpg_0", preprocess_cfg, max_pixels), _pixels(
        pair.image_1, "jpg_1", preprocess_cfg, max_pixels
    )


@dataclass
class SkipCounter:
    """Rows of one split that a loop skipped; each skip logs one warning line naming the row."""

    split: str
    count: int = 0

    def skip(self, index: int, pair: PreferencePair, reason: object) -> None:
        self.count += 1
        where = f" ({pair.origin})" if pair.origin else ""
        log.warning("%s pair %d%s skipped: %s", self.split, index, where, reason)


def decode_pair_or_error(
    pair: PreferencePair, preprocess_cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray] | InvalidInput:
    """``decode_pair``, returning the InvalidInput instead of raising it (for ``Executor.map``)."""
    try:
        return decode_pair(pair, preprocess_cfg, max_pixels)
    except InvalidInput as e:
        return e


def iter_decoded(
    pairs: Iterable[PreferencePair],
    preprocess_cfg: PreprocessConfig,
    skipped: SkipCounter,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pool: Executor | None = None,
    chunk: int = 64,
) -> Iterator[tuple[PreferencePair, np.ndarray, np.ndarray]]:
    """(pair, pixels_0, pixels_1) for each decodable pair, in order; undecodable ones are counted in ``skipped``.

    With ``pool``, ``chunk`` pairs at a time are decoded on it. One bad image in millions of scraped
    rows must not stop a run, so InvalidInput is logged and skipped here; any other error propagates.
    """
    decode = functools.partial(decode_pair_or_error, preprocess_cfg=preprocess_cfg, max_pixels=max_pixels)
    pairs, index = iter(pairs), 0
    while block := list(itertools.islice(pairs, chunk)):
        for pair, result in zip(block, pool.map(decode, block) if pool else map(decode, block)):
            if isinstance(result, InvalidInput):
                skipped.skip(index, pair, result)
            else:
                yield pair, *result
            index += 1


def _pixels(data: bytes, column: str, cfg: PreprocessConfig, max_pixels: int) -> np.ndarray:
    try:
        return load_pixels(data, cfg, max_pixels)
    except InvalidInput as e:
        raise InvalidInput(f"{column}: {e}") from e
