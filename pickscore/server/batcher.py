"""Dynamic batching for one tower: many requests' items, one forward pass.

    batcher = Batcher("image", backend.encode_image, max_batch_size=32, max_delay_s=0.005, capacity=1024, metrics=m)
    await batcher.start()
    with batcher.admit(n):                      # Overloaded at once when n more items do not fit
        emb = await batcher.submit(pixels, deadline)   # (3, H, W) -> (D,)

Two tasks own the queue and nobody else touches it: the collector takes items until ``max_batch_size``
or until ``max_delay_s`` has passed since the oldest one, and hands the batch over a one-slot queue to
the runner, which calls the backend on the tower's own thread. While the runner computes, the collector
already holds the next batch: exactly one batch is prefetched. Items whose caller is gone or whose
deadline has passed are dropped before they cost compute, at collection and again just before the run.
A backend exception fails that batch's items (Internal) and nothing else. Items are taken by priority
(KServe's ``priority`` parameter), then in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from pickscore.errors import DeadlineExceeded, Internal, Overloaded, Unavailable
from pickscore.server.metrics import Metrics

log = logging.getLogger("pickscore.server")


DEFAULT_PRIORITY = 1 << 31  # priority 0 ("default", as Triton) queues behind every explicit level 1, 2, ...


@dataclass(order=True)
class _Item:
    rank: tuple[int, int]  # (priority level, arrival number): lower goes first
    x: np.ndarray = field(compare=False)
    deadline: float | None = field(compare=False)  # loop time
    enqueued: float = field(compare=False)  # loop time
    future: asyncio.Future = field(compare=False, repr=False)


class Batcher:
    def __init__(
        self,
        tower: str,
        fn: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        max_delay_s: float,
        capacity: int,
        metrics: Metrics,
    ):
        self.tower = tower
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.capacity = capacity
        self.metrics = metrics
        self.admitted = 0  # items reserved by requests and not yet computed (the queue-depth gauge)
        self._queue: asyncio.PriorityQueue[_Item] = asyncio.PriorityQueue()  # bounded by admission, not by maxsize
        self._arrivals = 0
        self._arrived = asyncio.Event()
        self._ready: asyncio.Queue[list[_Item]] = asyncio.Queue(maxsize=1)  # the one prefetched batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{tower}-tower")
        self._tasks: list[asyncio.Task] = []
        metrics.queue_capacity.labels(tower).set(capacity)
        # this tower's series, looked up once rather than per item on the hot path
        self._queue_wait = metrics.queue_wait.labels(tower)
        self._batch_size = metrics.batch_size.labels(tower)
        self._inference = metrics.inference.labels(tower)
        self._depth = metrics.queue_depth.labels(tower)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._collect(), name=f"{self.tower}-collector"),
            asyncio.create_task(self._run(), name=f"{self.tower}-runner"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._queue.empty():
            self._fail(self._queue.get_nowait(), Unavailable("server stopped"))
        self._executor.shutdown(wait=True)

    @contextmanager
    def admit(self, n: int) -> Iterator[None]:
        """Reserve room for ``n`` items for the block's duration; Overloaded at once when there is none."""
        if self.admitted + n > self.capacity:
            raise Overloaded(
                f"{self.tower} queue full ({self.admitted} of {self.capacity} items admitted, "
                f"{n} more asked); retry with backoff"
            )
        self._set_admitted(self.admitted + n)
        try:
            yield
        finally:
            self._set_admitted(self.admitted - n)

    async def submit(self, x: np.ndarray, deadline: float | None = None, priority: int = 0) -> np.ndarray:
        """One item (already admitted) -> its row of the backend's output. Priority 1 is the highest; 0 is default."""
        loop = asyncio.get_running_loop()
        self._arrivals += 1
        item = _Item((priority or DEFAULT_PRIORITY, self._arrivals), x, deadline, loop.time(), loop.create_future())
        self._queue.put_nowait(item)
        self._arrived.set()
        return await item.future  # cancelling this (client gone) marks the item dropped

    def _set_admitted(self, n: int) -> None:
        self.admitted = n
        self._depth.set(n)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            close_at = batch[0].enqueued + self.max_delay_s
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                wait = close_at - loop.time()
                if wait <= 0:
                    break
                self._arrived.clear()  # waiting on an event, not on get(): a timed-out get() could lose an item
                try:
                    await asyncio.wait_for(self._arrived.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            batch = self._live(batch, loop.time())
            if batch:
                await self._ready.put(batch)  # blocks while the runner still holds the previous one

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._live(await self._ready.get(), loop.time())
            if not batch:
                continue
            start = loop.time()
            for item in batch:
                self._queue_wait.observe(start - item.enqueued)
            self._batch_size.observe(len(batch))
            # Items of one kind share a forward pass: uint8 crops and (KServe) float32 pixels do not stack.
            kinds: dict[tuple[str, tuple[int, ...]], list[_Item]] = {}
            for item in batch:
                kinds.setdefault((item.x.dtype.str, item.x.shape), []).append(item)
            try:
                for items in kinds.values():
                    await self._forward(loop, items)
            finally:
                self._inference.observe(loop.time() - start)

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        x = np.stack([item.x for item in batch])  # (B, ...)
        try:
            out = await loop.run_in_executor(self._executor, self.fn, x)
        except Exception as e:  # a backend failure fails this batch only
            log.exception("%s tower failed on a batch of %d", self.tower, len(batch))
            self.metrics.batch_failures.labels(self.tower).inc()
            error = Internal(f"the {self.tower} tower failed on a batch of {len(batch)}: {type(e).__name__}: {e}")
            for item in batch:
                self._fail(item, error)
            return
        for item, row in zip(batch, out):
            if not item.future.done():
                item.future.set_result(row)

    def _live(self, batch: list[_Item], now: float) -> list[_Item]:
        """The items still worth computing; the rest are dropped (and told so, if anyone is waiting)."""
        live = []
        for item in batch:
            if item.future.done():  # cancelled: the caller left
                self.metrics.dropped.labels(self.tower, "cancelled").inc()
            elif item.deadline is not None and now >= item.deadline:
                self.metrics.dropped.labels(self.tower, "deadline").inc()
                self._fail(
                    item,
                    DeadlineExceeded(
                        f"deadline passed after {now - item.enqueued:.3f} s in the {self.tower} queue, before compute"
                    ),
                )
            else:
                live.append(item)
        return live

    @staticmethod
    def _fail(item: _Item, error: Exception) -> None:
        if not item.future.done():
            item.future.set_exception(error)
