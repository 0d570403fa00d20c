"""The embedding cache on its own: least recently used out first within its bytes, hits and misses counted, and
concurrent misses of one key sharing one computation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pickscore.errors import DeadlineExceeded
from pickscore.server.caches import EmbeddingCache
from pickscore.server.metrics import Metrics

D = 4  # float32: 16 bytes an embedding


def emb(value: float) -> np.ndarray:
    return np.full(D, value, np.float32)


def counted(metrics: Metrics, name: str, cache: str = "text") -> float:
    return metrics.registry.get_sample_value(name, {"model": "m", "cache": cache})


class Computations:
    """compute() callables that record which keys were computed."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def of(self, key: str, value: float):
        async def compute() -> np.ndarray:
            self.keys.append(key)
            return emb(value)

        return compute


def test_hits_and_misses_are_counted_and_a_hit_does_not_compute():
    async def main() -> None:
        metrics, computed = Metrics(), Computations()
        cache = EmbeddingCache("text", 1 << 10, metrics.for_model("m"))
        first = await cache.get_or_compute("a cat", computed.of("a cat", 1.0))
        again = await cache.get_or_compute("a cat", computed.of("a cat", 2.0))
        np.testing.assert_array_equal(again, first)
        assert computed.keys == ["a cat"] and len(cache) == 1
        assert counted(metrics, "pickscore_cache_misses_total") == 1
        assert counted(metrics, "pickscore_cache_hits_total") == 1
        assert counted(metrics, "pickscore_cache_hits_total", "image") == 0  # each cache its own series

    asyncio.run(main())


def test_bytes_held_are_the_values_and_keys_and_the_least_recently_used_goes_first():
    async def main() -> None:
        metrics, computed = Metrics(), Computations()
        cache = EmbeddingCache("image", 2 * (16 + 1), metrics.for_model("m"))  # two one-letter keys
        await cache.get_or_compute("a", computed.of("a", 1.0))
        await cache.get_or_compute("b", computed.of("b", 2.0))
        assert cache.nbytes == 34 and counted(metrics, "pickscore_cache_bytes", "image") == 34
        await cache.get_or_compute("a", computed.of("a", 1.0))  # a is now the most recently used
        await cache.get_or_compute("c", computed.of("c", 3.0))  # b goes
        assert cache.nbytes == 34 and len(cache) == 2
        await cache.get_or_compute("a", computed.of("a", 1.0))
        assert computed.keys == ["a", "b", "c"]
        await cache.get_or_compute("b", computed.of("b", 2.0))  # computed again; c (least recent) goes
        await cache.get_or_compute("a", computed.of("a", 1.0))
        assert computed.keys == ["a", "b", "c", "b"]
        await cache.get_or_compute("c", computed.of("c", 3.0))
        assert computed.keys == ["a", "b", "c", "b", "c"]

    asyncio.run(main())


def test_a_value_larger_than_the_cache_is_returned_but_not_kept():
    async def main() -> None:
        metrics, computed = Metrics(), Computations()
        cache = EmbeddingCache("text", 16 + 1, metrics.for_model("m"))
        await cache.get_or_compute("a", computed.of("a", 1.0))
        big = await cache.get_or_compute("long key", computed.of("long key", 2.0))  # 16 + 8 bytes
        np.testing.assert_array_equal(big, emb(2.0))
        assert len(cache) == 1 and cache.nbytes == 17  # and nothing else was evicted for it
        await cache.get_or_compute("a", computed.of("a", 1.0))
        assert computed.keys == ["a", "long key"]

    asyncio.run(main())


def test_a_cache_of_zero_bytes_computes_every_time_and_counts_nothing():
    async def main() -> None:
        metrics, computed = Metrics(), Computations()
        cache = EmbeddingCache("text", 0, metrics.for_model("m"))
        for _ in range(3):
            await cache.get_or_compute("a", computed.of("a", 1.0))
        assert computed.keys == ["a"] * 3 and len(cache) == 0
        assert counted(metrics, "pickscore_cache_misses_total") == 0
        assert counted(metrics, "pickscore_cache_hits_total") == 0

    asyncio.run(main())


def test_concurrent_misses_of_one_key_share_one_computation():
    async def main() -> None:
        metrics = Metrics()
        cache = EmbeddingCache("text", 1 << 10, metrics.for_model("m"))
        release, calls = asyncio.Event(), []

        async def compute() -> np.ndarray:
            calls.append(1)
            await release.wait()
            return emb(5.0)

        waiting = [asyncio.ensure_future(cache.get_or_compute("a", compute)) for _ in range(3)]
        await asyncio.sleep(0)  # all three are waiting now
        release.set()
        results = await asyncio.gather(*waiting)
        assert len(calls) == 1
        assert all(np.array_equal(r, emb(5.0)) for r in results)
        assert counted(metrics, "pickscore_cache_misses_total") == 1
        assert counted(metrics, "pickscore_cache_hits_total") == 2

    asyncio.run(main())


@pytest.mark.parametrize("leave", ["cancel", "deadline"])
def test_a_waiter_computes_for_itself_when_the_owner_leaves(leave):
    """The owner of a shared computation is cancelled (its client left) or runs out of time: that is not the
    waiter's failure, so the waiter computes the value itself instead of failing with the owner."""

    async def main() -> None:
        cache = EmbeddingCache("text", 1 << 10, Metrics().for_model("m"))
        started, release = asyncio.Event(), asyncio.Event()

        async def owners() -> np.ndarray:
            started.set()
            await release.wait()
            raise DeadlineExceeded("the owner's deadline passed")

        async def waiters() -> np.ndarray:
            return emb(7.0)

        owner = asyncio.ensure_future(cache.get_or_compute("a", owners))
        await started.wait()
        waiter = asyncio.ensure_future(cache.get_or_compute("a", waiters))
        await asyncio.sleep(0)
        if leave == "cancel":
            owner.cancel()
        else:
            release.set()
        np.testing.assert_array_equal(await waiter, emb(7.0))
        with pytest.raises(asyncio.CancelledError if leave == "cancel" else DeadlineExceeded):
            await owner
        assert len(cache) == 1

    asyncio.run(main())


def test_a_failed_computation_fails_its_waiters_and_is_not_kept():
    async def main() -> None:
        cache = EmbeddingCache("text", 1 << 10, Metrics().for_model("m"))
        release = asyncio.Event()

        async def broken() -> np.ndarray:
            await release.wait()
            raise ValueError("tokenizer failed")

        calls = [asyncio.ensure_future(cache.get_or_compute("a", broken)) for _ in range(2)]
        await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(r) for r in results] == [ValueError, ValueError]
        assert len(cache) == 0
        np.testing.assert_array_equal(await cache.get_or_compute("a", Computations().of("a", 1.0)), emb(1.0))

    asyncio.run(main())
