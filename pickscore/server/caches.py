"""Embedding caches bounded in bytes, least recently used out first.

    emb = await cache.get_or_compute(key, compute)   # compute: async () -> (D,) float32 array

Concurrent misses of one key share one computation (best-of-N clients often send the same prompt at
once). A cache of 0 bytes is off: every call computes and nothing is counted.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import numpy as np

from pickscore.errors import DeadlineExceeded
from pickscore.server.metrics import Metrics


class _Abandoned(Exception):
    """The computation a waiter shared was cancelled or timed out with its owner."""


class EmbeddingCache:
    def __init__(self, name: str, capacity_bytes: int, metrics: Metrics):
        self.name = name
        self.capacity = capacity_bytes
        self.metrics = metrics
        self.nbytes = 0
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._pending: dict[str, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[np.ndarray]]) -> np.ndarray:
        if not self.capacity:
            return await compute()
        if (hit := self._entries.get(key)) is not None:
            self._entries.move_to_end(key)
            self.metrics.cache_hits.labels(self.name).inc()
            return hit
        if (pending := self._pending.get(key)) is not None:  # someone is computing it right now
            self.metrics.cache_hits.labels(self.name).inc()
            try:
                return await asyncio.shield(pending)
            except _Abandoned:  # its owner left or ran out of time; that is not this caller's fault
                return await self.get_or_compute(key, compute)
        self.metrics.cache_misses.labels(self.name).inc()
        future = self._pending[key] = asyncio.get_running_loop().create_future()
        try:
            value = await compute()
        except BaseException as e:
            own = isinstance(e, (asyncio.CancelledError, DeadlineExceeded))
            future.set_exception(_Abandoned() if own else e)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._pending[key]
        future.set_result(value)
        self._put(key, value)
        return value

    def _put(self, key: str, value: np.ndarray) -> None:
        size = _size(key, value)
        if size > self.capacity:
            return
        # its own copy: a computed embedding is a row of its batch's output, a view that would keep the whole batch
        # (up to max_batch_size rows) alive for as long as the entry, beyond the bytes the cache counts
        self._entries[key] = value.copy()
        self.nbytes += size
        while self.nbytes > self.capacity:
            old_key, old = self._entries.popitem(last=False)
            self.nbytes -= _size(old_key, old)
        self.metrics.cache_bytes.labels(self.name).set(self.nbytes)


def _size(key: str, value: np.ndarray) -> int:
    return value.nbytes + len(key)
