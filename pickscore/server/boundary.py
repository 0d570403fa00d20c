"""The gRPC boundary every RPC passes through: server state (ready, draining, in flight), auth, request ids,
the one log line, the request metrics, and the mapping of domain errors to a status (``pickscore.status``).

    async with boundary(state, "Score", context):   # refuses work while not ready or draining,
        ...                                          # maps errors, times and counts the request, logs once
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

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

    def check_credentials(self, context: grpc.aio.ServicerContext) -> None:
        if not self.tokens.required:
            return
        given = _metadata(context, "authorization")
        if given is None:
            raise Unauthenticated("missing credentials: send the metadata `authorization: Bearer TOKEN`")
        scheme, _, token = given.partition(" ")
        if not (self.tokens.accepts(token.strip()) and scheme.lower() == "bearer"):  # always compared: no early exit
            raise Unauthenticated("wrong credentials in the `authorization` metadata")

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
            self.metrics.refusals.labels("client_limit").inc()
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


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name and value:
            return str(value)
    return None


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for per-caller limits: the ``x-client-id`` metadata, else the peer's address (no port)."""
    if given := _metadata(context, "x-client-id"):
        return given[:128]
    peer = context.peer() or "unknown"  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:/path"
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``x-request-id`` metadata, or a fresh id."""
    return (_metadata(context, "x-request-id") or uuid.uuid4().hex[:16])[:128]


@asynccontextmanager
async def boundary(
    state: ServerState, rpc: str, context: grpc.aio.ServicerContext, admit: bool = True
) -> AsyncIterator[str]:
    """Refuse work unless accepting (``admit``); time, count, log and map errors to a status. Yields the request id."""
    rid = request_id(context)
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    state.enter()
    try:
        state.check_credentials(context)
        if admit:
            state.check_accepting()
            with state.caller_slot(caller_of(context)):
                yield rid
        else:
            yield rid
    except asyncio.CancelledError:  # the client left
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as e:
        code, message = status_of(e)
        level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
        log.log(
            level,
            message,
            exc_info=code == grpc.StatusCode.INTERNAL and not isinstance(e, PickScoreError),
            extra={"request_id": rid, "rpc": rpc, "code": code.name},
        )
        await context.abort(code, message, trailing_metadata(e))
    finally:
        state.leave()
        elapsed = time.perf_counter() - start
        state.metrics.request_duration.labels(rpc, code.name).observe(elapsed)
        state.metrics.requests.labels(rpc, code.name).inc()
        if code == grpc.StatusCode.OK:
            log.debug("ok", extra={"request_id": rid, "rpc": rpc, "code": code.name, "duration_s": round(elapsed, 6)})
