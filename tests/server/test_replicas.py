"""Several replicas behind one client target: calls spread round robin, and a draining replica's refusals
(UNAVAILABLE) are retried on another, so a rolling restart never reaches the caller."""

from __future__ import annotations

from contextlib import ExitStack

from pickscore.client import Client
from pickscore.server.app import ServerThread
from tests.server.conftest import PROMPT, jpeg, metric, settings_for


def ok(server) -> float:
    return metric(server, "pickscore_requests_total", rpc="Score", code="OK")


def test_calls_spread_over_replicas_and_ride_through_a_drain(tiny_hf_dir):
    with ExitStack() as stack:
        a, b = (stack.enter_context(ServerThread(settings_for(tiny_hf_dir))) for _ in range(2))
        with Client(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}") as client:
            for i in range(12):
                client.score(PROMPT, [jpeg(i)])
            assert ok(a) >= 3 and ok(b) >= 3 and ok(a) + ok(b) == 12  # both replicas did work

            a.server.state.draining = True  # what SIGTERM does first: refuse new work with UNAVAILABLE
            try:
                before = ok(b)
                scores = [client.score(PROMPT, [jpeg(i)]) for i in range(8)]
            finally:
                a.server.state.draining = False  # so that leaving the block drains and stops it as usual
            assert all(len(s) == 1 for s in scores)  # every call succeeded...
            refused = metric(a, "pickscore_requests_total", rpc="Score", code="UNAVAILABLE")
            assert refused >= 1  # ...though some first reached the draining replica
            assert ok(b) - before == 8
