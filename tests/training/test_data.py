"""Decoding Pick-a-Pic pairs into pixels: both images, bad rows skipped, counted and logged."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pickscore.datasets.pickapic import PreferencePair, iter_pairs
from pickscore.errors import InvalidInput
from pickscore.model.preprocess import PreprocessConfig
from pickscore.training.data import SkipCounter, decode_pair, iter_decoded
from tests.datasets.test_pickapic import png, row, write

SMALL = PreprocessConfig(shortest_edge=32, crop_size=(32, 32))


def test_decode_pair_gives_both_pixel_tensors():
    pixels_0, pixels_1 = decode_pair(PreferencePair("p", png((255, 0, 0)), png((0, 0, 255)), 1.0, 0.0, 1), SMALL)
    assert pixels_0.shape == pixels_1.shape == (3, 32, 32) and pixels_0.dtype == np.float32
    assert pixels_0[0].mean() > pixels_1[0].mean() and pixels_1[2].mean() > pixels_0[2].mean()  # red, then blue
    with pytest.raises(InvalidInput, match="jpg_1: not a decodable image"):
        decode_pair(PreferencePair("p", png((0, 0, 0)), b"garbage", 1.0, 0.0, 1), SMALL)


def test_undecodable_rows_are_skipped_counted_and_logged(tmp_path, caplog):
    rows = [row(i) for i in range(6)]
    rows[2]["jpg_0"] = b"garbage"
    rows[4]["jpg_1"] = b""
    write(tmp_path / "train" / "part-00000.parquet", rows)
    skipped = SkipCounter("train")
    with caplog.at_level(logging.WARNING, logger="pickscore.training.data"):
        decoded = list(iter_decoded(iter_pairs(tmp_path, "train"), SMALL, skipped))
    assert [pair.caption for pair, _, _ in decoded] == ["prompt 0", "prompt 1", "prompt 3", "prompt 5"]
    assert all(p0.shape == p1.shape == (3, 32, 32) for _, p0, p1 in decoded)
    assert skipped.count == 2
    assert [r.getMessage() for r in caplog.records] == [
        "train pair 2 (part-00000.parquet row 2) skipped: jpg_0: not a decodable image (cannot identify image file; "
        "supported: JPEG, PNG, WEBP, GIF, BMP, TIFF)",
        "train pair 4 (part-00000.parquet row 4) skipped: jpg_1: empty file",
    ]
    # Decoding on a thread pool, in small chunks, keeps the order, the pixels and the count.
    pooled_skips = SkipCounter("train")
    with ThreadPoolExecutor(2) as pool:
        pooled = list(iter_decoded(iter_pairs(tmp_path, "train"), SMALL, pooled_skips, pool=pool, chunk=4))
    assert [p.caption for p, _, _ in pooled] == [p.caption for p, _, _ in decoded] and pooled_skips.count == 2
    assert all((a == c).all() and (b == d).all() for (_, a, b), (_, c, d) in zip(pooled, decoded))
