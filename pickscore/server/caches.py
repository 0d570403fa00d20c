"""Embedding caches bounded in bytes, least recently used out first.

    embs = await cache.get_many(keys, compute)   # compute: async (positions) -> (len(positions), D) float32

A request's keys are looked up together and its misses computed together (one call: one block through a tower).
Concurrent misses of one key share one computation (best-of-N clients often send the same prompt at once), within
a request and across requests. A cache of 0 bytes is off: every call computes and nothing is counted.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

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

    async def get_many(self, keys: Sequence[str], compute: Callable[[list[int]], Awaitable[np.ndarray]]) -> np.ndarray:
        """Each key's embedding, (len(keys), D) in order: hits from the cache, keys being computed right now from
        that computation, and the rest from one ``compute(positions)`` -> (len(positions), D) over the positions of
        ``keys`` to compute (a repeated key once)."""
        if not self.capacity:
            return await compute(list(range(len(keys))))
        rows: list[np.ndarray | None] = [None] * len(keys)
        mine: list[int] = []  # positions this call computes
        shared: list[tuple[int, asyncio.Future]] = []  # positions another computation (or this one) answers
        loop = asyncio.get_running_loop()
        for i, key in enumerate(keys):
            if (hit := self._entries.get(key)) is not None:
                self._entries.move_to_end(key)
                rows[i] = hit
            elif (pending := self._pending.get(key)) is not None:
                shared.append((i, pending))
            else:
                self._pending[key] = loop.create_future()
                mine.append(i)
        if hits := len(keys) - len(mine):
            self.metrics.cache_hits.labels(self.name).inc(hits)
        if mine:
            self.metrics.cache_misses.labels(self.name).inc(len(mine))
            try:
                block = await compute(mine)
            except BaseException as e:
                own = isinstance(e, (asyncio.CancelledError, DeadlineExceeded))
                for i in mine:  # the waiters of an abandoned computation compute for themselves
                    future = self._pending.pop(keys[i])
                    future.set_exception(_Abandoned() if own else e)
                    future.exception()  # mark retrieved: nobody else may be waiting
                raise
            for i, row in zip(mine, block):
                self._pending.pop(keys[i]).set_result(row)
                self._put(keys[i], row)
                rows[i] = row
        for i, pending in shared:
            try:
                rows[i] = await asyncio.shield(pending)
            except _Abandoned:  # its owner left or ran out of time; that is not this caller's fault
                rows[i] = (await self.get_many([keys[i]], lambda _, i=i: compute([i])))[0]
        return np.stack(rows)

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
