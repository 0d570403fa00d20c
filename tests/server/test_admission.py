"""Admission on a fake clock, without threads or sleeps: refusals by count, by queue wait (a bound in seconds, or
auto's, from the measured batch time) and by deadline, counted per priority level, and the throughput estimate they
rest on; --max-queue-wait-s as the server reads it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pickscore.cli import build_parser
from pickscore.errors import Overloaded, Unavailable
from pickscore.server.admission import AUTO, Admission, Throughput
from pickscore.server.batcher import Batcher
from pickscore.server.metrics import Metrics
from pickscore.server.settings import Settings


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def admission(
    capacity: int = 100, max_wait_s: float | None = 0.0, batch_size: int = 1, depth: int = 1
) -> tuple[Admission, Clock, list[str], list[float]]:
    clock, refusals, waits = Clock(), [], []
    adm = Admission(
        "image",
        capacity,
        max_wait_s,
        clock=clock,
        on_refused=refusals.append,
        on_wait=waits.append,
        batch_size=batch_size,
        depth=depth,
    )
    return adm, clock, refusals, waits


def measure(adm: Admission, clock: Clock, items: int = 10, seconds: float = 1.0) -> None:
    """One busy spell: ``items`` admitted, computed in ``seconds``, released."""
    with adm.reserve(items):
        clock.advance(seconds)
        adm.completed(items)


def test_a_request_that_does_not_fit_the_capacity_is_refused_and_one_that_fits_exactly_is_not():
    adm, _, refusals, _ = admission(capacity=4)
    with adm.reserve(3):
        with pytest.raises(Overloaded) as refused:
            with adm.reserve(2):
                pass
        assert str(refused.value) == "image queue full (3 of 4 items admitted, 2 more asked); retry with backoff"
        assert refused.value.retry_after_s is None  # nothing measured yet: no hint
        assert refusals == ["queue_full"]
        with adm.reserve(1):
            assert adm.admitted == 4
    assert adm.admitted == 0
    with adm.reserve(4):  # the room is back once the requests are done
        pass


def test_a_full_queue_hints_its_estimated_wait():
    adm, clock, _, _ = admission(capacity=8)
    measure(adm, clock, items=8, seconds=0.8)  # 0.1 s an item
    with adm.reserve(8), pytest.raises(Overloaded) as refused:
        with adm.reserve(1):
            pass
    assert refused.value.retry_after_s == pytest.approx(0.8)


def test_a_wait_over_the_limit_is_refused_with_the_time_until_it_would_fit():
    adm, clock, refusals, waits = admission(max_wait_s=0.5)
    measure(adm, clock)
    with adm.reserve(5):  # 0.5 s of work ahead: not over the limit
        with adm.reserve(1):
            pass
        assert refusals == []
        with adm.reserve(1):  # now 0.6 s ahead
            with pytest.raises(Overloaded) as refused:
                with adm.reserve(2):
                    pass
    assert refusals == ["queue_wait"]
    assert waits == [0.0, pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.6)]
    assert refused.value.retry_after_s == pytest.approx(0.1)
    assert str(refused.value) == (
        "image tower busy: 2 items would queue about 0.6 s behind 6 admitted (100 ms each) "
        "over 0.5 s (--max-queue-wait-s); retry in 0.1 s"
    )


def test_without_a_wait_limit_only_the_count_is_checked():
    adm, clock, refusals, waits = admission(capacity=100, max_wait_s=0.0)
    measure(adm, clock, items=1, seconds=10.0)  # 10 s an item
    with adm.reserve(50), adm.reserve(50, deadline=clock() + 1.0):
        pass
    assert refusals == [] and waits == []


def refused_by(adm: Admission, n: int) -> Overloaded | None:
    """The refusal of a request of ``n`` items at the default level, or None when it was admitted (and released)."""
    try:
        with adm.reserve(n):
            return None
    except Overloaded as e:
        return e


@pytest.mark.parametrize("seconds_per_item", [0.1, 0.3])
def test_auto_bounds_the_wait_at_one_measured_batch_time_and_a_slower_tower_gets_a_longer_bound(seconds_per_item):
    adm, clock, refusals, _ = admission(max_wait_s=AUTO, batch_size=4)
    measure(adm, clock, items=10, seconds=10 * seconds_per_item)
    with adm.reserve(4):  # one batch time ahead: the bound, not over it
        assert refused_by(adm, 3) is None
        with adm.reserve(1):  # one item over
            refused = refused_by(adm, 2)
    assert refusals == ["queue_wait"]
    bound = 4 * seconds_per_item
    assert refused.retry_after_s == pytest.approx(seconds_per_item)  # the one item over the bound drains first
    assert str(refused) == (
        f"image tower busy: 2 items would queue about {5 * seconds_per_item:.3g} s behind 5 admitted "
        f"({seconds_per_item * 1000:.3g} ms each) over {bound:.3g} s (auto: 1 x the measured batch time, 4 items x "
        f"{seconds_per_item * 1000:.3g} ms; --max-queue-wait-s); retry in {seconds_per_item:.2g} s"
    )


def test_auto_keeps_a_batch_for_each_batch_in_flight():
    """An accelerator's tower runs ``depth`` batches at once: auto lets that many full batches queue."""
    adm, clock, refusals, _ = admission(max_wait_s=AUTO, batch_size=4, depth=2)
    measure(adm, clock)
    with adm.reserve(8):
        assert refused_by(adm, 8) is None
        with adm.reserve(1):
            assert "over 0.8 s (auto: 2 x the measured batch time, 4 items x 100 ms" in str(refused_by(adm, 1))
    assert refusals == ["queue_wait"]


def test_auto_counts_the_work_at_the_requests_level_or_above():
    adm, clock, refusals, _ = admission(max_wait_s=AUTO, batch_size=4)
    measure(adm, clock)
    with adm.reserve(8):  # two batch times at the default level: nothing ahead of level 1
        with adm.reserve(4, priority=1):
            assert refused_by(adm, 1) is not None
            with pytest.raises(Overloaded), adm.reserve(1, priority=1):  # 4 ahead at level 1: admitted; 5: not
                with adm.reserve(1, priority=1):
                    pass
    assert refusals == ["queue_wait", "queue_wait"]


def test_a_cold_tower_under_auto_admits_by_its_batch_count_until_something_is_measured():
    """Before any completion there are no seconds per item, but auto's bound in items holds: a burst on a cold
    server queues no more than ``depth`` batches (and one request) however large ``capacity`` is."""
    adm, _, refusals, waits = admission(capacity=1000, max_wait_s=AUTO, batch_size=4)
    with adm.reserve(4):
        with adm.reserve(1):
            refused = refused_by(adm, 3)
    assert refusals == ["queue_wait"] and waits == []
    assert refused.retry_after_s is None  # nothing measured: no hint in seconds
    assert str(refused) == (
        "image tower busy: 3 items would queue behind 5 admitted, over auto's 4 (1 x the measured batch time, 4 "
        "items, nothing measured yet; --max-queue-wait-s); retry with backoff"
    )
    fixed, _, refusals, _ = admission(capacity=1000, max_wait_s=0.5)
    with fixed.reserve(900):  # a bound in seconds has nothing to go by yet: count alone
        assert refused_by(fixed, 100) is None
    assert refusals == []


def test_a_request_that_would_finish_past_its_deadline_is_refused():
    adm, clock, refusals, _ = admission(max_wait_s=10.0)
    measure(adm, clock)
    with adm.reserve(3):  # 0.3 s ahead, then the request's own 2 items: done in 0.5 s
        with adm.reserve(2, deadline=clock() + 0.6), adm.reserve(1, deadline=None):
            pass
        with pytest.raises(Overloaded) as refused:
            with adm.reserve(2, deadline=clock() + 0.4):
                pass
    assert refusals == ["deadline"]
    assert refused.value.retry_after_s == pytest.approx(0.1)
    assert "and finish in about 0.5 s, after the 0.4 s left before its deadline; retry in 0.1 s" in str(refused.value)


def test_a_request_alone_is_not_refused_for_its_deadline():
    """With nothing ahead, a short deadline is left to the batcher's own check (the request may yet make it)."""
    adm, clock, refusals, _ = admission(max_wait_s=10.0)
    measure(adm, clock)
    with adm.reserve(5, deadline=clock() + 0.01):
        pass
    assert refusals == []


def test_work_at_a_lower_priority_does_not_hold_back_a_higher_one():
    adm, clock, refusals, _ = admission(max_wait_s=0.5)
    measure(adm, clock)
    with adm.reserve(6):  # default level: 0.6 s ahead of the default level, nothing ahead of level 1
        assert adm.estimated_wait(0) == pytest.approx(0.6)
        assert adm.estimated_wait(1) == 0.0
        with adm.reserve(3, priority=1):
            assert adm.estimated_wait(2) == pytest.approx(0.3)
            assert adm.estimated_wait(0) == pytest.approx(0.9)
        with pytest.raises(Overloaded):
            with adm.reserve(1):
                pass
    assert refusals == ["queue_wait"]


def test_higher_priority_work_holds_back_lower_and_equal_levels():
    adm, clock, refusals, _ = admission(max_wait_s=0.5)
    measure(adm, clock)
    with adm.reserve(6, priority=2):
        with adm.reserve(1, priority=1):  # above it: nothing ahead
            pass
        for priority in (2, 3, 0):
            with pytest.raises(Overloaded):
                with adm.reserve(1, priority=priority):
                    pass
    assert refusals == ["queue_wait"] * 3
    assert adm.estimated_wait(2) == 0.0  # every level released


def test_a_request_that_fails_gives_its_room_back():
    adm, clock, _, _ = admission(capacity=4)
    measure(adm, clock, items=4)
    with pytest.raises(RuntimeError), adm.reserve(4, priority=3):
        raise RuntimeError("a bad image")
    assert adm.admitted == 0 and adm.estimated_wait(3) == 0.0
    with adm.reserve(4):
        pass


def test_the_estimate_follows_completions_recent_batches_weighing_most():
    adm, clock, _, _ = admission()
    assert adm.estimated_wait() is None and adm.throughput.per_item is None
    measure(adm, clock, items=10, seconds=1.0)
    assert adm.throughput.per_item == pytest.approx(0.1)
    measure(adm, clock, items=10, seconds=3.0)
    assert adm.throughput.per_item == pytest.approx((0.9 * 1.0 + 3.0) / (0.9 * 10 + 10))
    for _ in range(60):
        measure(adm, clock, items=10, seconds=3.0)
    assert adm.throughput.per_item == pytest.approx(0.3, rel=1e-2)


def test_idle_time_is_not_counted_and_busy_spells_without_a_completion_are():
    adm, clock, _, _ = admission()
    measure(adm, clock, items=10, seconds=1.0)
    clock.advance(1000.0)  # idle: nothing admitted
    with adm.reserve(1):  # busy 0.5 s, then the request left before its batch finished
        clock.advance(0.5)
    clock.advance(1000.0)
    with adm.reserve(10):
        clock.advance(0.5)
        adm.completed(10)  # 1 s of busy time for these 10 items, across both spells
    assert adm.throughput.per_item == pytest.approx((0.9 * 1.0 + 1.0) / (0.9 * 10 + 10))


def test_busy_time_is_split_between_completions_in_one_spell():
    throughput = Throughput(decay=0.0)  # only the last batch counts
    throughput.busy(0.0, True)
    throughput.completed(2.0, 4)
    assert throughput.per_item == 0.5
    throughput.completed(2.5, 5)  # 0.5 s since the last completion, not 2.5
    assert throughput.per_item == pytest.approx(0.1)
    throughput.busy(3.0, False)
    throughput.busy(9.0, True)
    throughput.completed(9.5, 1)  # 0.5 s before the idle gap, 0.5 s after it
    assert throughput.per_item == pytest.approx(1.0)


def test_the_batcher_counts_refusals_and_refuses_everything_once_hung():
    """The batcher's side: refusals reach pickscore_admission_refusals, the queue depth is read at scrape time, and
    a hung tower answers Unavailable before admission is asked."""

    async def main() -> None:
        metrics = Metrics()
        batcher = Batcher("text", lambda x: x, 4, 0.0, capacity=2, metrics=metrics.for_model("m"))
        with batcher.admit(2):
            assert metrics.registry.get_sample_value("pickscore_queue_depth", {"model": "m", "tower": "text"}) == 2
            with pytest.raises(Overloaded, match="text queue full"):
                with batcher.admit(1):
                    pass
        assert metrics.registry.get_sample_value("pickscore_queue_depth", {"model": "m", "tower": "text"}) == 0
        assert (
            metrics.registry.get_sample_value(
                "pickscore_admission_refusals_total", {"model": "m", "reason": "queue_full"}
            )
            == 1
        )
        batcher.hung = "the text tower is hung"
        with pytest.raises(Unavailable, match="hung"):
            with batcher.admit(1):
                pass
        with pytest.raises(Unavailable, match="hung"):
            await batcher.submit(np.zeros(3))
        await batcher.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    "argv, env, limit",
    [
        ([], {}, AUTO),  # the default
        (["--max-queue-wait-s", "2.5"], {"PICKSCORE_MAX_QUEUE_WAIT_S": "auto"}, 2.5),  # a flag beats the variable
        ([], {"PICKSCORE_MAX_QUEUE_WAIT_S": " AUTO "}, AUTO),
        (["--max-queue-wait-s", "0"], {}, 0.0),  # admission by count alone
    ],
)
def test_max_queue_wait_s_is_auto_unless_given_seconds(argv, env, limit):
    settings = Settings.from_namespace(build_parser().parse_args(["serve", *argv]), environ=env)
    assert settings.queue_wait_limit() == limit


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_max_queue_wait_s_that_is_neither_auto_nor_seconds_is_refused_naming_the_flag(value):
    with pytest.raises(ValueError) as refused:
        Settings.from_namespace(build_parser().parse_args(["serve", "--max-queue-wait-s", value]), environ={})
    assert str(refused.value) == (
        f"max_queue_wait_s must be auto or a number of seconds, 0 or more; got {value!r} "
        "(--max-queue-wait-s or PICKSCORE_MAX_QUEUE_WAIT_S)"
    )
