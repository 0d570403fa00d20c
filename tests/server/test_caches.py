"""The embedding cache on its own: least recently used out first within its bytes, hits and misses counted,
concurrent misses of one key sharing one computation, and a request's keys looked up and computed together."""

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


async def one(cache: EmbeddingCache, key: str, compute) -> np.ndarray:
    """One key through ``get_many``: ``compute()`` makes that key's (D,) row."""

    async def block(positions: list[int]) -> np.ndarray:
        assert positions == [0]
        return (await compute())[None]

    return (await cache.get_many([key], block))[0]


def test_a_requests_keys_are_looked_up_together_and_its_misses_computed_in_one_call():
    async def main() -> None:
        metrics = Metrics()
        cache = EmbeddingCache("image", 1 << 10, metrics.for_model("m"))
        await one(cache, "b", Computations().of("b", 2.0))
        release, calls = asyncio.Event(), []

        async def slow(positions: list[int]) -> np.ndarray:  # another request, computing "d" right now
            await release.wait()
            return np.stack([emb(4.0)])

        other = asyncio.ensure_future(cache.get_many(["d"], slow))
        await asyncio.sleep(0)

        async def compute(positions: list[int]) -> np.ndarray:
            calls.append(positions)
            release.set()
            return np.stack([emb(10.0 + i) for i in positions])

        keys = ["a", "b", "c", "a", "d"]  # a miss, a hit, a miss, the first miss again, one being computed
        got = await cache.get_many(keys, compute)
        assert calls == [[0, 2]]  # one call, each missing key once
        np.testing.assert_array_equal(got, np.stack([emb(10.0), emb(2.0), emb(12.0), emb(10.0), emb(4.0)]))
        np.testing.assert_array_equal(await other, np.stack([emb(4.0)]))
        assert counted(metrics, "pickscore_cache_misses_total", "image") == 1 + 2 + 1  # b earlier, a and c, d
        assert counted(metrics, "pickscore_cache_hits_total", "image") == 3  # b, the second a, d (shared)
        assert len(cache) == 4

    asyncio.run(main())


def test_hits_and_misses_are_counted_and_a_hit_does_not_compute():
    async def main() -> None:
        metrics, computed = Metrics(), Computations()
        cache = EmbeddingCache("text", 1 << 10, metrics.for_model("m"))
        first = await one(cache, "a cat", computed.of("a cat", 1.0))
        again = await one(cache, "a cat", computed.of("a cat", 2.0))
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
        await one(cache, "a", computed.of("a", 1.0))
        await one(cache, "b", computed.of("b", 2.0))
        assert cache.nbytes == 34 and counted(metrics, "pickscore_cache_bytes", "image") == 34
        await one(cache, "a", computed.of("a", 1.0))  # a is now the most recently used
        await one(cache, "c", computed.of("c", 3.0))  # b goes
        assert cache.nbytes == 34 and len(cache) == 2
        await one(cache, "a", computed.of("a", 1.0))
        assert computed.keys == ["a", "b", "c"]
        await one(cache, "b", computed.of("b", 2.0))  # computed again; c (least recent) goes
        await one(cache, "a", computed.of("a", 1.0))
        assert computed.keys == ["a", "b", "c", "b"]
        await one(cache, "c", computed.of("c", 3.0))
        assert computed.keys == ["a", "b", "c", "b", "c"]

    asyncio.run(main())


def test_a_value_larger_than_the_cache_is_returned_but_not_kept():
    async def main() -> None:
        metrics, computed = Metrics(), Computations()
        cache = EmbeddingCache("text", 16 + 1, metrics.for_model("m"))
        await one(cache, "a", computed.of("a", 1.0))
        big = await one(cache, "long key", computed.of("long key", 2.0))  # 16 + 8 bytes
        np.testing.assert_array_equal(big, emb(2.0))
        assert len(cache) == 1 and cache.nbytes == 17  # and nothing else was evicted for it
        await one(cache, "a", computed.of("a", 1.0))
        assert computed.keys == ["a", "long key"]

    asyncio.run(main())


def test_a_cache_of_zero_bytes_computes_every_time_and_counts_nothing():
    async def main() -> None:
        metrics, computed = Metrics(), Computations()
        cache = EmbeddingCache("text", 0, metrics.for_model("m"))
        for _ in range(3):
            await one(cache, "a", computed.of("a", 1.0))
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

        waiting = [asyncio.ensure_future(one(cache, "a", compute)) for _ in range(3)]
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

        owner = asyncio.ensure_future(one(cache, "a", owners))
        await started.wait()
        waiter = asyncio.ensure_future(one(cache, "a", waiters))
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

        calls = [asyncio.ensure_future(one(cache, "a", broken)) for _ in range(2)]
        await asyncio.sleep(0)
        release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(r) for r in results] == [ValueError, ValueError]
        assert len(cache) == 0
        np.testing.assert_array_equal(await one(cache, "a", Computations().of("a", 1.0)), emb(1.0))

    asyncio.run(main())
