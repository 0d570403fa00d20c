"""Dynamic batching for one tower: many requests' items, one forward pass; admission by count and by time.

    batcher = Batcher("image", backend.encode_image, max_batch_size=32, max_delay_s=0.005, capacity=1024,
                      metrics=m, max_wait_s=5.0, timeout_s=120.0, on_hung=print, max_gather_s=0.1)
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

Admission. ``admit`` reserves room for a request's items for as long as the request runs. It refuses at
once (Overloaded, with a retry hint) when the items do not fit in ``capacity``, when the estimated queue
wait -- the items admitted at the request's priority or above times the measured seconds per item --
exceeds ``max_wait_s``, or when that wait plus the request's own items would end past its deadline. Seconds per item are
completions over busy time (time during which anything was admitted), so they measure the whole path up
to this tower (decoding included), not the forward pass alone; recent batches weigh most.

Watchdog. A forward pass that has not returned after ``timeout_s`` fails its batch (Internal), marks the
tower hung and calls ``on_hung``; from then on every item and every admission is refused (Unavailable):
the stuck thread cannot be reclaimed, so the replica must be replaced.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
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


class Throughput:
    """Seconds per item while there is work: completions over busy time, recent batches weighing most.

    ``busy(now, True/False)`` when work appears and when none is left; ``completed(now, n)`` after a batch.
    """

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self._seconds = 0.0
        self._items = 0.0
        self._idle_busy = 0.0  # busy seconds accrued since the last completion, in busy spells already over
        self._since: float | None = None  # start of the current busy spell, or of its part since a completion

    def busy(self, now: float, busy: bool) -> None:
        if busy and self._since is None:
            self._since = now
        elif not busy and self._since is not None:
            self._idle_busy += now - self._since
            self._since = None

    def completed(self, now: float, n: int) -> None:
        seconds = self._idle_busy + (now - self._since if self._since is not None else 0.0)
        self._idle_busy = 0.0
        if self._since is not None:
            self._since = now
        self._seconds = self.decay * self._seconds + seconds
        self._items = self.decay * self._items + n

    @property
    def per_item(self) -> float | None:
        """Estimated seconds per item; None before the first completion."""
        return self._seconds / self._items if self._items else None


class Batcher:
    def __init__(
        self,
        tower: str,
        fn: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        max_delay_s: float,
        capacity: int,
        metrics: Metrics,
        max_wait_s: float = 0.0,
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
        self.capacity = capacity
        self.metrics = metrics
        self.max_wait_s = max_wait_s  # 0: admission by count alone
        self.timeout_s = timeout_s  # 0: no watchdog
        self.on_hung = on_hung
        self.hung = ""  # why the tower is out of service, once a forward pass outlived timeout_s
        self.throughput = Throughput()
        self.admitted = 0  # items reserved by requests and not yet computed (the queue-depth gauge)
        self.preparing_now = 0  # items of admitted requests being prepared (decoded) for this tower right now
        self._by_level: Counter[int] = Counter()  # admitted items per priority level
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
        metrics.queue_capacity.labels(tower).set(capacity)
        # this tower's series, looked up once rather than per item on the hot path
        self._queue_wait = metrics.queue_wait.labels(tower)
        self._batch_size = metrics.batch_size.labels(tower)
        self._inference = metrics.inference.labels(tower)
        self._depth = metrics.queue_depth.labels(tower)
        self._wait = metrics.estimated_wait.labels(tower)

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

    def estimated_wait(self, priority: int = 0) -> float | None:
        """Seconds a new item at ``priority`` would queue behind the work admitted at that level or above;
        None before any measurement."""
        per_item = self.throughput.per_item
        if per_item is None:
            return None
        level = priority or DEFAULT_PRIORITY
        return sum(count for lvl, count in self._by_level.items() if lvl <= level) * per_item

    @contextmanager
    def admit(self, n: int, deadline: float | None = None, priority: int = 0) -> Iterator[None]:
        """Reserve room for ``n`` items for the block's duration; Overloaded at once when there is no room or
        no time (module docstring), Unavailable once the tower is hung."""
        if self.hung:
            raise Unavailable(self.hung)
        if self.admitted + n > self.capacity:
            self.metrics.refusals.labels("queue_full").inc()
            raise Overloaded(
                f"{self.tower} queue full ({self.admitted} of {self.capacity} items admitted, "
                f"{n} more asked); retry with backoff",
                self.estimated_wait(priority),
            )
        self._check_time(n, deadline, priority)
        level = priority or DEFAULT_PRIORITY
        self._by_level[level] += n
        self._set_admitted(self.admitted + n)
        try:
            yield
        finally:
            self._by_level[level] -= n
            if not self._by_level[level]:
                del self._by_level[level]
            self._set_admitted(self.admitted - n)

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

    def _check_time(self, n: int, deadline: float | None, priority: int) -> None:
        """Refuse when the queue wait exceeds ``max_wait_s``, or when the wait plus the request's own items would
        run past its deadline (only when there is a queue: alone, a request is the batcher's deadline check's)."""
        if not self.max_wait_s:
            return
        wait = self.estimated_wait(priority)
        if wait is None:
            return
        self._wait.set(wait)
        finish = wait + n * self.throughput.per_item
        left = math.inf if deadline is None else deadline - asyncio.get_running_loop().time()
        if wait > self.max_wait_s:
            reason, retry = "queue_wait", wait - self.max_wait_s
            limit = f"over {self.max_wait_s:g} s (--max-queue-wait-s)"
        elif wait > 0 and finish > left:
            reason, retry = "deadline", finish - left
            limit = f"and finish in about {finish:.3g} s, after the {left:.3g} s left before its deadline"
        else:
            return
        self.metrics.refusals.labels(reason).inc()
        # the queue drains at the measured rate: ``retry`` seconds from now the same request would fit
        raise Overloaded(
            f"{self.tower} tower busy: {n} items would queue about {wait:.3g} s behind {self.admitted} admitted "
            f"({self.throughput.per_item * 1000:.3g} ms each) {limit}; retry in {retry:.2g} s",
            retry,
        )

    async def submit(self, x: np.ndarray, deadline: float | None = None, priority: int = 0) -> np.ndarray:
        """One item (already admitted) -> its row of the backend's output. Priority 1 is the highest; 0 is default."""
        if self.hung:
            raise Unavailable(self.hung)
        loop = asyncio.get_running_loop()
        self._arrivals += 1
        item = _Item((priority or DEFAULT_PRIORITY, self._arrivals), x, deadline, loop.time(), loop.create_future())
        self._queue.put_nowait(item)
        self._arrived.set()
        return await item.future  # cancelling this (client gone) marks the item dropped

    def _set_admitted(self, n: int) -> None:
        self.throughput.busy(asyncio.get_running_loop().time(), n > 0)
        self.admitted = n
        self._depth.set(n)

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
                self.throughput.completed(loop.time(), len(batch))
                if (per_item := self.throughput.per_item) is not None:
                    self._wait.set(self.admitted * per_item)
        finally:
            self._slots.release()

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        rows = [item.x for item in batch]  # stacked on the tower's thread: megabytes of copying, off the event loop
        call = loop.run_in_executor(self._executor, lambda: self.fn(np.stack(rows)))
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
