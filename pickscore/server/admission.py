"""Admission for one tower: whether a request's items may queue, decided at once, by count and by time.

    admission = Admission("image", capacity=1024, max_wait_s=AUTO, batch_size=32, depth=1)  # clock: monotonic
    with admission.reserve(n, deadline, priority):      # Overloaded at once: no room, or no time
        ...                                              # the items are computed; admission.completed(k) per batch

``reserve`` holds room for a request's items for as long as the request runs. It refuses (Overloaded, with a
retry hint) when the items do not fit in ``capacity``, when the estimated queue wait -- the items admitted at the
request's priority or above times the measured seconds per item -- exceeds the bound, or when that wait plus
the request's own items would end past its deadline (in the clock's seconds). Seconds per item are completions
over busy time (time during which anything was admitted), so they measure the whole path up to the tower
(decoding, and other towers' work on a shared thread, included), not the forward pass alone; recent batches
weigh most.

The bound: ``max_wait_s`` seconds, or ``AUTO``: ``depth`` times the measured batch time (``batch_size`` x seconds
per item), as much work as keeps the tower's ``depth`` batches in flight busy and no more (docs/DESIGN.md,
"Admission by time"). Since the estimate and the auto bound rest on the same seconds per item, auto refuses when
more than ``depth`` x ``batch_size`` items are ahead -- which it can tell before anything is measured, so a cold
tower under a burst queues no more than that either.

Nothing here waits or runs on its own: the caller reports completions, and ``clock`` says what time it is.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pickscore.errors import Overloaded

AUTO = None  # max_wait_s: the bound follows the measured batch time
DEFAULT_PRIORITY = 1 << 31  # priority 0 ("default", as Triton) queues behind every explicit level 1, 2, ...


def level(priority: int) -> int:
    """The queueing level of a request's priority: lower goes first, 0 (default) after every explicit level."""
    return priority or DEFAULT_PRIORITY


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


class Admission:
    """One tower's admitted items and their estimated wait. ``max_wait_s``: seconds, ``AUTO`` (``depth`` x
    ``batch_size`` x the measured seconds per item), or 0: admission by count alone.

    ``on_refused(reason)`` is told every refusal (queue_full, queue_wait, deadline); ``on_wait(seconds)`` every
    wait estimate a time check made.
    """

    def __init__(
        self,
        tower: str,
        capacity: int,
        max_wait_s: float | None = 0.0,
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
        batch_size: int = 1,
        depth: int = 1,
    ):
        self.tower = tower
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self.batch_size = batch_size  # the tower's most items per forward pass
        self.depth = depth  # its batches in flight at once
        self.clock = clock
        self.on_refused = on_refused
        self.on_wait = on_wait
        self.throughput = Throughput()
        self.admitted = 0  # items reserved by requests and not yet released
        self._by_level: Counter[int] = Counter()  # admitted items per priority level

    def estimated_wait(self, priority: int = 0) -> float | None:
        """Seconds a new item at ``priority`` would queue behind the work admitted at that level or above;
        None before any measurement."""
        per_item = self.throughput.per_item
        return None if per_item is None else self._ahead(priority) * per_item

    @property
    def auto_items(self) -> int:
        """Under ``AUTO``, the most items that may be ahead of a new request: ``depth`` full batches."""
        return self.depth * self.batch_size

    def _ahead(self, priority: int) -> int:
        """Items admitted at ``priority``'s level or above."""
        mine = level(priority)
        return sum(count for lvl, count in self._by_level.items() if lvl <= mine)

    @contextmanager
    def reserve(self, n: int, deadline: float | None = None, priority: int = 0) -> Iterator[None]:
        """Hold room for ``n`` items for the block's duration; Overloaded at once when there is no room or no
        time (module docstring)."""
        if self.admitted + n > self.capacity:
            self._refused("queue_full")
            raise Overloaded(
                f"{self.tower} queue full ({self.admitted} of {self.capacity} items admitted, "
                f"{n} more asked); retry with backoff",
                self.estimated_wait(priority),
            )
        self._check_time(n, deadline, priority)
        lvl = level(priority)
        self._by_level[lvl] += n
        self._set_admitted(self.admitted + n)
        try:
            yield
        finally:
            self._by_level[lvl] -= n
            if not self._by_level[lvl]:
                del self._by_level[lvl]
            self._set_admitted(self.admitted - n)

    def completed(self, n: int) -> None:
        """A batch of ``n`` items finished (or failed): the throughput estimate takes it in."""
        self.throughput.completed(self.clock(), n)

    def _check_time(self, n: int, deadline: float | None, priority: int) -> None:
        """Refuse when the queue wait exceeds the bound, or when the wait plus the request's own items would run
        past its deadline (only when there is a queue: alone, a request is the batcher's deadline check's)."""
        if self.max_wait_s == 0:
            return
        ahead, per_item = self._ahead(priority), self.throughput.per_item
        if per_item is None:  # nothing measured yet: auto's bound in items still holds; a bound in seconds waits
            if self.max_wait_s is AUTO and ahead > self.auto_items:
                self._refused("queue_wait")
                raise Overloaded(
                    f"{self.tower} tower busy: {n} items would queue behind {ahead} admitted, over auto's "
                    f"{self.auto_items} ({self._auto_rule()}, nothing measured yet; --max-queue-wait-s); "
                    "retry with backoff",
                    None,
                )
            return
        wait = ahead * per_item
        if self.on_wait:
            self.on_wait(wait)
        if self.max_wait_s is AUTO:
            bound = self.auto_items * per_item
            over = ahead > self.auto_items  # in items: the same seconds per item on both sides
            limit = f"over {bound:.3g} s (auto: {self._auto_rule()} x {per_item * 1000:.3g} ms; --max-queue-wait-s)"
        else:
            bound = self.max_wait_s
            over = wait > bound
            limit = f"over {bound:g} s (--max-queue-wait-s)"
        finish = wait + n * per_item
        left = math.inf if deadline is None else deadline - self.clock()
        if over:
            reason, retry = "queue_wait", wait - bound
        elif wait > 0 and finish > left:
            reason, retry = "deadline", finish - left
            limit = f"and finish in about {finish:.3g} s, after the {left:.3g} s left before its deadline"
        else:
            return
        self._refused(reason)
        # the queue drains at the measured rate: ``retry`` seconds from now the same request would fit
        raise Overloaded(
            f"{self.tower} tower busy: {n} items would queue about {wait:.3g} s behind {self.admitted} admitted "
            f"({per_item * 1000:.3g} ms each) {limit}; retry in {retry:.2g} s",
            retry,
        )

    def _auto_rule(self) -> str:
        """Auto's bound in words: its multiple of the measured batch time, and the batch."""
        return f"{self.depth} x the measured batch time, {self.batch_size} items"

    def _refused(self, reason: str) -> None:
        if self.on_refused:
            self.on_refused(reason)

    def _set_admitted(self, n: int) -> None:
        self.throughput.busy(self.clock(), n > 0)
        self.admitted = n
