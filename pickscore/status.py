"""Domain errors <-> gRPC status codes and HTTP statuses: the tables the server and the client both read.

    status_of(InvalidInput("image 3: ..."))           # (StatusCode.INVALID_ARGUMENT, "image 3: ...")
    error_for(StatusCode.RESOURCE_EXHAUSTED, "...")   # Overloaded("...")

Neutral ground: it imports grpc and the domain errors only, so a client-only install never loads the server.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from pickscore.errors import (
    Conflict,
    DeadlineExceeded,
    Forbidden,
    Internal,
    InvalidInput,
    NotFound,
    Overloaded,
    PickScoreError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

STATUS: dict[type[PickScoreError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    Conflict: grpc.StatusCode.ABORTED,
    Internal: grpc.StatusCode.INTERNAL,
}
# A call its caller did not cancel comes back CANCELLED when the server shut down before a handler took it
# (gRPC core's pending calls, grpc/grpc#41785): the replica went away, which is what UNAVAILABLE says. A caller's
# own cancellation never reaches error_for (it ends in CancelledError or a cancelled future).
_ERRORS = {code: cls for cls, code in STATUS.items()} | {grpc.StatusCode.CANCELLED: Unavailable}
# The same errors as HTTP statuses (the HTTP front door and the reward client's HTTP path); a subclass before its
# base, since the first class an error is an instance of gives its status.
HTTP_STATUS: dict[type[PickScoreError], int] = {
    TooLarge: 413,
    InvalidInput: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Overloaded: 429,
    Internal: 500,
    Unavailable: 503,
    DeadlineExceeded: 504,
}
_HTTP_ERRORS = {status: cls for cls, status in HTTP_STATUS.items()}
# gRPC's standard server pushback trailer: a refusal's retry hint in milliseconds. A channel whose retry
# policy covers the code waits that long before retrying; our client also hands it on as retry_after_s.
RETRY_PUSHBACK = "grpc-retry-pushback-ms"
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for ``error``; anything unexpected is INTERNAL."""
    for cls, code in STATUS.items():
        if isinstance(error, cls):
            return code, str(error)
    if isinstance(error, PickScoreError):
        return grpc.StatusCode.INTERNAL, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def http_status_of(error: BaseException) -> int:
    """The HTTP status ``error`` is answered with; anything unexpected is 500."""
    return next((status for cls, status in HTTP_STATUS.items() if isinstance(error, cls)), 500)


def error_for_http(status: int, message: str, retry_after_s: float | None = None) -> PickScoreError:
    """The domain error an HTTP status stands for (``retry_after_s`` from a 429's headers)."""
    cls = _HTTP_ERRORS.get(status, PickScoreError)
    return Overloaded(message, retry_after_s) if cls is Overloaded else cls(message)


def retry_after_ms(error: BaseException) -> int | None:
    """An Overloaded refusal's retry hint in whole milliseconds (at least 1), or None when it has none."""
    retry = getattr(error, "retry_after_s", None)
    return None if retry is None else max(1, round(retry * 1000))


def trailing_metadata(error: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailers that go with ``error``'s status: an Overloaded refusal's retry hint, if it has one."""
    retry = retry_after_ms(error)
    return () if retry is None else ((RETRY_PUSHBACK, str(retry)),)


def error_for(
    code: grpc.StatusCode | int | None, message: str, trailers: Sequence[tuple[str, str | bytes]] = ()
) -> PickScoreError:
    """The domain error a status code (enum or its number, as in-band stream errors carry it) and its
    trailers stand for."""
    if isinstance(code, int):
        code = _BY_NUMBER.get(code)
    cls = _ERRORS.get(code, PickScoreError)
    if cls is Overloaded:
        hint = dict(trailers).get(RETRY_PUSHBACK)
        return Overloaded(message, None if hint is None else int(hint) / 1000)
    return cls(message)
