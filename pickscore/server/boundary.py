"""The boundary every request passes through, whatever its transport: server state (ready, draining, hung,
in flight), auth, per-caller slots, request ids, the one log line and the request metrics (``scope``); and
for gRPC, the mapping of domain errors to a status (``pickscore.status``) and what a call's context carries
(request id, caller, credentials, deadline: ``deadline_of``).

    async with boundary(state, "Score", context):   # gRPC: refuses work while not ready or draining,
        ...                                          # maps errors, times and counts the request, logs once
    async with scope(state, Call("http", "Score", rid, caller, authorization)):   # HTTP maps errors itself
        ...
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import grpc

from pickscore.errors import Overloaded, PickScoreError, Unauthenticated, Unavailable
from pickscore.server.metrics import Metrics
from pickscore.server.security import TokenSet
from pickscore.status import status_of, trailing_metadata

log = logging.getLogger("pickscore.server")


class ServerState:
    """Whether new work is accepted, and how much is in flight (drain waits for it to reach 0)."""

    def __init__(self, metrics: Metrics, tokens: TokenSet | None = None):
        self.metrics = metrics
        self.tokens = TokenSet() if tokens is None else tokens  # by default none required
        self.ready = False
        self.draining = False
        self.unhealthy = ""  # why this replica can no longer serve (a hung tower), once it cannot
        self.inflight = 0
        self.max_per_client = 0  # requests in flight per caller; 0: unlimited
        self.per_client: Counter[str] = Counter()

    def check_accepting(self) -> None:
        if self.unhealthy:
            raise Unavailable(self.unhealthy)
        if self.draining:
            raise Unavailable("server is draining (shutting down); retry on another replica")
        if not self.ready:
            raise Unavailable("server is warming up; retry shortly")

    def check_credentials(self, given: str | None) -> None:
        """``given``: the request's ``authorization`` metadata (gRPC) or header (HTTP)."""
        if not self.tokens.required:
            return
        if not given:
            raise Unauthenticated("missing credentials: send `authorization: Bearer TOKEN` (gRPC metadata or header)")
        scheme, _, token = given.partition(" ")
        if not (self.tokens.accepts(token.strip()) and scheme.lower() == "bearer"):  # always compared: no early exit
            raise Unauthenticated("wrong credentials in `authorization`")

    def enter(self) -> None:
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)

    def leave(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)

    @contextmanager
    def caller_slot(self, caller: str) -> Iterator[None]:
        """Hold one of ``caller``'s in-flight slots; Overloaded when it has none left (one caller cannot
        fill the queues and starve the others)."""
        if not self.max_per_client:
            yield
            return
        if self.per_client[caller] >= self.max_per_client:
            self.metrics.refusals.labels("", "client_limit").inc()
            raise Overloaded(
                f"caller {caller!r} already has {self.per_client[caller]} requests in flight, at most "
                f"{self.max_per_client} (--max-inflight-per-client); wait for one to finish"
            )
        self.per_client[caller] += 1
        try:
            yield
        finally:
            self.per_client[caller] -= 1
            if not self.per_client[caller]:
                del self.per_client[caller]


@dataclass(frozen=True)
class Call:
    """What a transport knows of a request before running it."""

    transport: str  # "grpc" or "http": a label of the request metrics
    rpc: str  # Score, Rank, ModelInfer, ...: the same names on every transport
    request_id: str
    caller: str  # for per-caller limits
    authorization: str | None  # the `authorization` metadata or header


def new_request_id(given: str | None) -> str:
    """The caller's ``x-request-id``, or a fresh id."""
    return (given or uuid.uuid4().hex[:16])[:128]


@asynccontextmanager
async def scope(state: ServerState, call: Call, admit: bool = True) -> AsyncIterator[None]:
    """What every transport does around a request: credentials; unless accepting (``admit``) refuse it; hold a
    caller slot; count it in flight; time, count and log it once. Errors propagate: each transport maps them
    to its own wire once (gRPC: ``boundary`` below; HTTP: ``server/http.py``)."""
    start = time.perf_counter()
    code = "OK"
    state.enter()
    try:
        state.check_credentials(call.authorization)
        if admit:
            state.check_accepting()
            with state.caller_slot(call.caller):
                yield
        else:
            yield
    except asyncio.CancelledError:  # the client left
        code = "CANCELLED"
        raise
    except Exception as e:
        status, message = status_of(e)
        code = status.name
        level = logging.ERROR if status == grpc.StatusCode.INTERNAL else logging.INFO
        log.log(
            level,
            message,
            exc_info=status == grpc.StatusCode.INTERNAL and not isinstance(e, PickScoreError),
            extra={"request_id": call.request_id, "rpc": call.rpc, "transport": call.transport, "code": code},
        )
        raise
    finally:
        state.leave()
        elapsed = time.perf_counter() - start
        state.metrics.request_duration.labels(call.transport, call.rpc, code).observe(elapsed)
        state.metrics.requests.labels(call.transport, call.rpc, code).inc()
        if code == "OK":
            extra = {"request_id": call.request_id, "rpc": call.rpc, "transport": call.transport, "code": code}
            log.debug("ok", extra={**extra, "duration_s": round(elapsed, 6)})


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name and value:
            return str(value)
    return None


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The gRPC client's deadline as event-loop time, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for per-caller limits: the ``x-client-id`` metadata, else the peer's address (no port)."""
    if given := _metadata(context, "x-client-id"):
        return given[:128]
    peer = context.peer() or "unknown"  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:/path"
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


@asynccontextmanager
async def boundary(
    state: ServerState, rpc: str, context: grpc.aio.ServicerContext, admit: bool = True
) -> AsyncIterator[str]:
    """A gRPC request's ``scope``, its errors mapped to a status (``pickscore.status``). Yields the request id."""
    call = Call(
        "grpc",
        rpc,
        new_request_id(_metadata(context, "x-request-id")),
        caller_of(context),
        _metadata(context, "authorization"),
    )
    try:
        async with scope(state, call, admit):
            yield call.request_id
    except asyncio.CancelledError:
        raise
    except Exception as e:
        code, message = status_of(e)
        await context.abort(code, message, trailing_metadata(e))
