"""An embedding cache holds the bytes it counts: an entry made from a row of a batch's output (what the towers hand
back: views into one array per batch) does not keep the rest of that batch alive. Found by benchmarks/soak_bench.py
under tracemalloc: every cached text row pinned its whole batch, up to max_batch_size times what the cache counted."""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np

from pickscore.server.caches import EmbeddingCache
from pickscore.server.metrics import Metrics


def test_a_cached_row_does_not_keep_its_batch_alive():
    async def main() -> tuple[weakref.ref, EmbeddingCache, np.ndarray]:
        cache = EmbeddingCache("text", 1 << 20, Metrics().for_model("m"))
        batch = np.arange(32 * 8, dtype=np.float32).reshape(32, 8).copy()  # one forward pass's output: owns its data
        batch_ref = weakref.ref(batch)

        async def compute(positions: list[int]) -> np.ndarray:
            return batch[3:4]  # the rows the batcher resolves this request's future with: a view of its batch

        (answered,) = await cache.get_many(["a prompt"], compute)
        np.testing.assert_array_equal(answered, np.arange(24, 32, dtype=np.float32))
        return batch_ref, cache, answered.copy()

    batch_ref, cache, expected = asyncio.run(main())
    gc.collect()
    assert batch_ref() is None  # the batch went with its callers; the cache kept 8 floats, not 32 x 8
    assert cache.nbytes == 8 * 4 + len("a prompt")

    async def hit() -> np.ndarray:
        async def never(positions: list[int]) -> np.ndarray:
            raise AssertionError("a hit computes nothing")

        return (await cache.get_many(["a prompt"], never))[0]

    np.testing.assert_array_equal(asyncio.run(hit()), expected)
