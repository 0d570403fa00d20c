"""Dynamic batching for one tower: many requests' items, one forward pass, behind its admission.

    batcher = Batcher("image", backend.encode_image, max_batch_size=32, max_delay_s=0.005, capacity=1024,
                      metrics=m, max_wait_s=AUTO, timeout_s=120.0, on_hung=print, max_gather_s=0.1)
    await batcher.start()
    with batcher.admit(n, deadline, priority):          # Overloaded at once: no room, or no time
        with batcher.preparing():                        # the batch being gathered waits for this item
            crop = await decode(jpeg)
        emb = await batcher.submit(crop, deadline, priority)     # (H, W, 3) -> (D,)

One task owns the queue and nobody else touches it: the runner. Whenever the tower is free it gathers the
next batch -- up to ``max_batch_size`` items, by priority (KServe's ``priority`` parameter), then in arrival
order -- and calls the backend on the tower's own thread. Items keep arriving while the tower computes, so
the batch after a busy one is taken whole and at once. A batch stays open past its oldest item for
``max_delay_s``, and for up to ``max_gather_s`` while items of admitted requests are still being prepared
(decoded, tokenised: ``preparing``): a request's eight images go through one forward pass, not three
uneven ones while its last images decode. Items whose caller is gone or whose deadline has passed are
dropped before they cost compute. A backend exception fails that batch's items (Internal) and nothing else.
With ``depth`` 2 (an accelerator) the runner gathers and starts the next batch while one is in flight, so one
batch's copy to the device overlaps the other's compute.

Admission. ``admit`` reserves room for a request's items for as long as the request runs, or refuses at once
(Overloaded, with a retry hint): by count (``capacity``) and by estimated queue wait (``max_wait_s``: seconds, or
``AUTO``, ``depth`` x this tower's measured batch time; the request's deadline). The decision and the throughput
estimate it rests on are ``pickscore.server.admission``'s; the batcher reports every finished batch to it and
keeps the gauges.

Watchdog. A forward pass that has not returned after ``timeout_s`` fails its batch (Internal), marks the
tower hung and calls ``on_hung``; from then on every item and every admission is refused (Unavailable):
the stuck thread cannot be reclaimed, so the replica must be replaced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from pickscore.errors import DeadlineExceeded, Internal, Unavailable
from pickscore.server.admission import Admission, level
from pickscore.server.metrics import Metrics

log = logging.getLogger("pickscore.server")


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
        max_wait_s: float | None = 0.0,
        timeout_s: float = 0.0,
        on_hung: Callable[[str], None] | None = None,
        max_gather_s: float = 0.0,
        executor: ThreadPoolExecutor | None = None,
        depth: int = 1,
    ):
        self.tower = tower
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_gather_s = max_gather_s  # how long a batch may wait for items still being prepared
        self.metrics = metrics
        self.timeout_s = timeout_s  # 0: no watchdog
        self.on_hung = on_hung
        self.hung = ""  # why the tower is out of service, once a forward pass outlived timeout_s
        self.preparing_now = 0  # items of admitted requests being prepared (decoded) for this tower right now
        self._queue: asyncio.PriorityQueue[_Item] = asyncio.PriorityQueue()  # bounded by admission, not by maxsize
        self._arrivals = 0
        self._arrived = asyncio.Event()
        # Batches in flight at once: 1, or 2 on an accelerator, where one batch's copy to the device overlaps the
        # other's compute (each thread on its own stream). Their threads: this tower's own, or one it shares with
        # the other tower (on a CPU, where a pass already uses every core and two would oversubscribe them).
        self.depth = depth
        self._slots = asyncio.Semaphore(depth)
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=depth, thread_name_prefix=f"{tower}-tower")
        self._computing: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        # this tower's series, looked up once rather than per item on the hot path
        self._queue_wait = metrics.queue_wait.labels(tower)
        self._batch_size = metrics.batch_size.labels(tower)
        self._inference = metrics.inference.labels(tower)
        self._wait = metrics.estimated_wait.labels(tower)
        self.admission = Admission(
            tower,
            capacity,
            max_wait_s,  # 0: admission by count alone; AUTO: depth x the measured batch time
            clock=lambda: asyncio.get_running_loop().time(),  # deadlines are loop time
            on_refused=lambda reason: metrics.refusals.labels(reason).inc(),
            on_wait=self._wait.set,
            batch_size=max_batch_size,
            depth=depth,
        )
        metrics.queue_capacity.labels(tower).set(capacity)
        metrics.queue_depth.labels(tower).set_function(lambda: self.admission.admitted)  # read at scrape time

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self.tower}-runner")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._computing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not self._queue.empty():
            self._fail(self._queue.get_nowait(), Unavailable("server stopped"))
        if self._owns_executor:
            self._executor.shutdown(wait=not self.hung)  # a hung thread is abandoned, not waited for
        self.fn = None  # a stopped tower holds no model: its admission's callbacks and this form cycles with it

    @contextmanager
    def admit(self, n: int, deadline: float | None = None, priority: int = 0) -> Iterator[None]:
        """Reserve room for ``n`` items for the block's duration (``Admission.reserve``: Overloaded at once when
        there is no room or no time), Unavailable once the tower is hung."""
        if self.hung:
            raise Unavailable(self.hung)
        with self.admission.reserve(n, deadline, priority):
            yield

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Around the work that makes an admitted item (decoding an image): while it runs, the batch being
        gathered waits for the item (up to ``max_gather_s``) instead of leaving it to a later forward pass."""
        self.preparing_now += 1
        try:
            yield
        finally:
            self.preparing_now -= 1
            self._arrived.set()  # the gathering batch stops waiting for an item that failed to come

    async def submit(self, x: np.ndarray, deadline: float | None = None, priority: int = 0) -> np.ndarray:
        """One item (already admitted) -> its row of the backend's output. Priority 1 is the highest; 0 is default."""
        if self.hung:
            raise Unavailable(self.hung)
        loop = asyncio.get_running_loop()
        self._arrivals += 1
        item = _Item((level(priority), self._arrivals), x, deadline, loop.time(), loop.create_future())
        self._queue.put_nowait(item)
        self._arrived.set()
        return await item.future  # cancelling this (client gone) marks the item dropped

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list[_Item]:
        """The next batch, taken when the tower is free: whatever is queued, up to ``max_batch_size``; open for
        ``max_delay_s`` past its oldest item, and up to ``max_gather_s`` past it while items are being prepared."""
        batch = [await self._queue.get()]
        delay_end = batch[0].enqueued + self.max_delay_s
        gather_end = batch[0].enqueued + max(self.max_gather_s, self.max_delay_s)
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            wait = (gather_end if self.preparing_now else delay_end) - loop.time()
            if wait <= 0:
                break
            self._arrived.clear()  # waiting on an event, not on get(): a timed-out get() could lose an item
            try:
                await asyncio.wait_for(self._arrived.wait(), wait)
            except asyncio.TimeoutError:
                pass
        return self._live(batch, loop.time())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # a batch is gathered only when it can start at once
            try:
                batch = await self._gather(loop)
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._compute(loop, batch))
            self._computing.add(task)
            task.add_done_callback(self._computing.discard)

    async def _compute(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        try:
            if self.hung:  # the tower's thread is stuck: nothing more can be computed here
                for item in batch:
                    self._fail(item, Unavailable(self.hung))
                return
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
                self.admission.completed(len(batch))
                if (per_item := self.admission.throughput.per_item) is not None:
                    self._wait.set(self.admission.admitted * per_item)
        finally:
            self._slots.release()

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        rows = [item.x for item in batch]  # stacked on the tower's thread: megabytes of copying, off the event loop
        fn = self.fn  # taken now: a pass queued on a shared thread may start after this tower stopped
        call = loop.run_in_executor(self._executor, lambda: fn(np.stack(rows)))
        done, _ = await asyncio.wait({call}, timeout=self.timeout_s or None)
        if not done:
            self._hang(len(batch))
            error = Internal(f"the {self.tower} tower did not return a batch of {len(batch)} in {self.timeout_s:g} s")
            for item in batch:
                self._fail(item, error)
            return
        try:
            out = call.result()
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

    def _hang(self, n: int) -> None:
        """The watchdog fired: out of service for good (the thread cannot be taken back), and say so."""
        self.hung = (
            f"the {self.tower} tower is hung (a batch of {n} outlived --batch-timeout-s {self.timeout_s:g}); "
            "this replica is out of service, retry on another"
        )
        log.error(self.hung)
        self.metrics.batch_failures.labels(self.tower).inc()
        self.metrics.tower_hung.labels(self.tower).set(1)
        while not self._queue.empty():
            self._fail(self._queue.get_nowait(), Unavailable(self.hung))
        if self.on_hung:
            self.on_hung(self.hung)

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
