"""Domain errors -> gRPC status codes, mapped once here for every service; the RPC boundary.

    async with boundary(state, "Score", context):   # refuses work while not ready or draining,
        ...                                          # maps errors, times and counts the request, logs once
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc

from pickscore.errors import (DeadlineExceeded, Internal, InvalidInput, NotFound, Overloaded, PickScoreError,
                              Unauthenticated, Unavailable)
from pickscore.server.metrics import Metrics

log = logging.getLogger("pickscore.server")

STATUS = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Internal: grpc.StatusCode.INTERNAL,
}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for ``error``; anything unexpected is INTERNAL."""
    for cls, code in STATUS.items():
        if isinstance(error, cls):
            return code, str(error)
    if isinstance(error, PickScoreError):
        return grpc.StatusCode.INTERNAL, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


class ServerState:
    """Whether new work is accepted, and how much is in flight (drain waits for it to reach 0)."""

    def __init__(self, metrics: Metrics, auth_token: str = ""):
        self.metrics = metrics
        self.auth_token = auth_token
        self.ready = False
        self.draining = False
        self.inflight = 0

    def check_accepting(self) -> None:
        if self.draining:
            raise Unavailable("server is draining (shutting down); retry on another replica")
        if not self.ready:
            raise Unavailable("server is warming up; retry shortly")

    def check_credentials(self, context: grpc.aio.ServicerContext) -> None:
        if not self.auth_token:
            return
        given = _metadata(context, "authorization")
        if given is None:
            raise Unauthenticated("missing credentials: send the metadata `authorization: Bearer TOKEN`")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.auth_token}".encode()):
            raise Unauthenticated("wrong credentials in the `authorization` metadata")

    def enter(self) -> None:
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)

    def leave(self) -> None:
        self.inflight -= 1
        self.metrics.inflight.set(self.inflight)


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name and value:
            return str(value)
    return None


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``x-request-id`` metadata, or a fresh id."""
    return (_metadata(context, "x-request-id") or uuid.uuid4().hex[:16])[:128]


@asynccontextmanager
async def boundary(state: ServerState, rpc: str, context: grpc.aio.ServicerContext,
                   admit: bool = True) -> AsyncIterator[str]:
    """Refuse work unless accepting (``admit``), then time, count, log and map errors to a status; yields the request id."""
    rid = request_id(context)
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    state.enter()
    try:
        state.check_credentials(context)
        if admit:
            state.check_accepting()
        yield rid
    except asyncio.CancelledError:  # the client left
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as e:
        code, message = status_of(e)
        level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
        log.log(level, message, exc_info=code == grpc.StatusCode.INTERNAL and not isinstance(e, PickScoreError),
                extra={"request_id": rid, "rpc": rpc, "code": code.name})
        await context.abort(code, message)
    finally:
        state.leave()
        elapsed = time.perf_counter() - start
        state.metrics.request_duration.labels(rpc, code.name).observe(elapsed)
        state.metrics.requests.labels(rpc, code.name).inc()
        if code == grpc.StatusCode.OK:
            log.debug("ok", extra={"request_id": rid, "rpc": rpc, "code": code.name, "duration_s": round(elapsed, 6)})
