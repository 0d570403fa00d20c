"""Dynamic batching for one tower: many requests' items, one forward pass, behind its admission.

    batcher = Batcher("image", backend.encode_image, max_batch_size=32, max_delay_s=0.005, capacity=1024,
                      metrics=m, max_wait_s=AUTO, timeout_s=120.0, on_hung=print, max_gather_s=0.1)
    await batcher.start()
    with batcher.admit(n, deadline, priority):          # Overloaded at once: no room, or no time
        with batcher.preparing(n):                       # the batch being gathered waits for these items
            crops = await decode(jpegs)
        embs = await batcher.submit(crops, deadline, priority)   # (n, H, W, 3) -> (n, D)

One task owns the queue and nobody else touches it: the runner. Whenever the tower is free it gathers the
next batch -- up to ``max_batch_size`` items, by priority (KServe's ``priority`` parameter), then in arrival
order -- and calls the backend on the tower's own thread. A request's items enter the queue as one block and
leave it with one future (the event loop's steps are per request, not per image: its interpreter lock is what
bounds one process feeding a GPU, docs/DESIGN.md "The host that feeds the GPU"); a block that does not fit the
room left in a batch is split, its first rows filling the batch and the rest first in line for the next. Items
keep arriving while the tower computes, so the batch after a busy one is taken whole and at once. A batch stays
open past its oldest item for ``max_delay_s``, and for up to ``max_gather_s`` while items of admitted requests
are still being prepared (decoded, tokenised: ``preparing``): requests arriving together go through one forward
pass, not one each as their images finish decoding. Items whose caller is gone or whose deadline has passed are
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


@dataclass(eq=False)
class _Block:
    """One request's rows for a tower: computed in one batch, or split over consecutive ones where they do not fit
    the room left; ``future`` gets every row's output at once."""

    x: np.ndarray | list[np.ndarray]  # k rows: an array (k, ...), or a list of arrays of one shape
    deadline: float | None  # loop time
    enqueued: float  # loop time
    future: asyncio.Future = field(repr=False)
    out: np.ndarray | None = None  # the rows computed so far, when the block was split

    def __post_init__(self) -> None:
        self.left = len(self.x)  # rows not yet computed

    @property
    def kind(self) -> tuple[str, tuple[int, ...]]:
        """What its rows stack with: their dtype and shape."""
        return self.x[0].dtype.str, self.x[0].shape

    def deliver(self, lo: int, rows: np.ndarray) -> None:
        """Rows ``lo`` ... of the block computed: the future's result once none is left."""
        if self.future.done():
            return
        if len(rows) == len(self.x):  # the whole block in one pass: its rows of the batch's output, no copy
            self.future.set_result(rows)
            return
        if self.out is None:
            self.out = np.empty((len(self.x), *rows.shape[1:]), rows.dtype)
        self.out[lo : lo + len(rows)] = rows
        self.left -= len(rows)
        if not self.left:
            self.future.set_result(self.out)


@dataclass(order=True)
class _Part:
    """Rows ``lo:hi`` of a block, as the queue holds them."""

    rank: tuple[int, int]  # (priority level, arrival number): lower goes first
    block: _Block = field(compare=False)
    lo: int = field(compare=False)
    hi: int = field(compare=False)

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    def split(self, n: int) -> tuple[_Part, _Part]:
        """The first ``n`` rows, and the rest (same rank: still first in line)."""
        return _Part(self.rank, self.block, self.lo, self.lo + n), _Part(self.rank, self.block, self.lo + n, self.hi)


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
        self._queue: asyncio.PriorityQueue[_Part] = asyncio.PriorityQueue()  # bounded by admission, not by maxsize
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
    def preparing(self, n: int = 1) -> Iterator[None]:
        """Around the work that makes ``n`` admitted items (decoding a request's images): while it runs, the batch
        being gathered waits for them (up to ``max_gather_s``) instead of leaving them to a later forward pass."""
        self.preparing_now += n
        try:
            yield
        finally:
            self.preparing_now -= n
            self._arrived.set()  # the gathering batch stops waiting for items that failed to come

    async def submit(
        self, x: np.ndarray | list[np.ndarray], deadline: float | None = None, priority: int = 0
    ) -> np.ndarray:
        """A request's items, already admitted: an array (k, ...) or a list of k arrays of one shape (stacked on
        the tower's thread, not here) -> their rows of the backend's output (k, ...), computed in one forward pass
        or, where they do not fit the batch being gathered, in consecutive ones. Priority 1 is the highest; 0 is
        default."""
        if self.hung:
            raise Unavailable(self.hung)
        if not len(x):
            raise ValueError("no items to submit")
        loop = asyncio.get_running_loop()
        self._arrivals += 1
        block = _Block(x, deadline, loop.time(), loop.create_future())
        self._queue.put_nowait(_Part((level(priority), self._arrivals), block, 0, len(x)))
        self._arrived.set()
        return await block.future  # cancelling this (client gone) marks its items dropped

    def _fit(self, part: _Part, room: int) -> _Part:
        """At most ``room`` rows of a part taken from the queue (the rest goes back, still first in line)."""
        if part.rows > room:
            part, rest = part.split(room)
            self._queue.put_nowait(rest)
        return part

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list[_Part]:
        """The next batch, taken when the tower is free: whatever is queued, up to ``max_batch_size`` rows; open for
        ``max_delay_s`` past its oldest item, and up to ``max_gather_s`` past it while items are being prepared."""
        batch = [self._fit(await self._queue.get(), self.max_batch_size)]
        rows = batch[0].rows
        delay_end = batch[0].block.enqueued + self.max_delay_s
        gather_end = batch[0].block.enqueued + max(self.max_gather_s, self.max_delay_s)
        while rows < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._fit(self._queue.get_nowait(), self.max_batch_size - rows))
                rows += batch[-1].rows
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

    async def _compute(self, loop: asyncio.AbstractEventLoop, batch: list[_Part]) -> None:
        rows = sum(part.rows for part in batch)
        try:
            if self.hung:  # the tower's thread is stuck: nothing more can be computed here
                for part in batch:
                    self._fail(part, Unavailable(self.hung))
                return
            start = loop.time()
            for part in batch:
                self._queue_wait.observe(start - part.block.enqueued)
            self._batch_size.observe(rows)
            # Items of one kind share a forward pass: uint8 crops and (KServe) float32 pixels do not stack.
            kinds: dict[tuple[str, tuple[int, ...]], list[_Part]] = {}
            for part in batch:
                kinds.setdefault(part.block.kind, []).append(part)
            try:
                for parts in kinds.values():
                    await self._forward(loop, parts)
            finally:
                self._inference.observe(loop.time() - start)
                self.admission.completed(rows)
                if (per_item := self.admission.throughput.per_item) is not None:
                    self._wait.set(self.admission.admitted * per_item)
        finally:
            self._slots.release()

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Part]) -> None:
        # joined on the tower's thread: megabytes of copying, off the event loop
        pieces = [part.block.x[part.lo : part.hi] for part in batch]
        n = sum(len(p) for p in pieces)
        fn = self.fn  # taken now: a pass queued on a shared thread may start after this tower stopped
        call = loop.run_in_executor(self._executor, lambda: fn(_join(pieces)))
        done, _ = await asyncio.wait({call}, timeout=self.timeout_s or None)
        if not done:
            self._hang(n)
            error = Internal(f"the {self.tower} tower did not return a batch of {n} in {self.timeout_s:g} s")
            for part in batch:
                self._fail(part, error)
            return
        try:
            out = call.result()
        except Exception as e:  # a backend failure fails this batch only
            log.exception("%s tower failed on a batch of %d", self.tower, n)
            self.metrics.batch_failures.labels(self.tower).inc()
            error = Internal(f"the {self.tower} tower failed on a batch of {n}: {type(e).__name__}: {e}")
            for part in batch:
                self._fail(part, error)
            return
        start = 0
        for part in batch:
            part.block.deliver(part.lo, out[start : start + part.rows])
            start += part.rows

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

    def _live(self, batch: list[_Part], now: float) -> list[_Part]:
        """The parts still worth computing; the rest are dropped (and told so, if anyone is waiting)."""
        live = []
        for part in batch:
            block = part.block
            if block.future.done():  # cancelled (the caller left), or failed in an earlier part
                self.metrics.dropped.labels(self.tower, "cancelled").inc(part.rows)
            elif block.deadline is not None and now >= block.deadline:
                self.metrics.dropped.labels(self.tower, "deadline").inc(part.rows)
                self._fail(
                    part,
                    DeadlineExceeded(
                        f"deadline passed after {now - block.enqueued:.3f} s in the {self.tower} queue, before compute"
                    ),
                )
            else:
                live.append(part)
        return live

    @staticmethod
    def _fail(part: _Part, error: Exception) -> None:
        if not part.block.future.done():
            part.block.future.set_exception(error)


def _join(pieces: list[np.ndarray | list[np.ndarray]]) -> np.ndarray:
    """Parts' rows as one batch: arrays joined, lists of rows stacked."""
    if all(isinstance(p, np.ndarray) for p in pieces):
        return np.concatenate(pieces)
    return np.stack([row for p in pieces for row in p])
