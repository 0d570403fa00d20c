"""The gRPC boundary every RPC passes through: server state (ready, draining, in flight), auth, request ids,
the one log line, the request metrics, and the mapping of domain errors to a status (``pickscore.status``).

    async with boundary(state, "Score", context):   # refuses work while not ready or draining,
        ...                                          # maps errors, times and counts the request, logs once
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from pickscore.errors import PickScoreError, Unauthenticated, Unavailable
from pickscore.server.metrics import Metrics
from pickscore.status import status_of

log = logging.getLogger("pickscore.server")


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
        await context.abort(code, message)
    finally:
        state.leave()
        elapsed = time.perf_counter() - start
        state.metrics.request_duration.labels(rpc, code.name).observe(elapsed)
        state.metrics.requests.labels(rpc, code.name).inc()
        if code == grpc.StatusCode.OK:
            log.debug("ok", extra={"request_id": rid, "rpc": rpc, "code": code.name, "duration_s": round(elapsed, 6)})
