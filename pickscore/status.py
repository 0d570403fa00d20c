"""Domain errors <-> gRPC status codes: the one table the server and the client both read.

    status_of(InvalidInput("image 3: ..."))           # (StatusCode.INVALID_ARGUMENT, "image 3: ...")
    error_for(StatusCode.RESOURCE_EXHAUSTED, "...")   # Overloaded("...")

Neutral ground: it imports grpc and the domain errors only, so a client-only install never loads the server.
"""

from __future__ import annotations

import grpc

from pickscore.errors import (
    DeadlineExceeded,
    Internal,
    InvalidInput,
    NotFound,
    Overloaded,
    PickScoreError,
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
    Internal: grpc.StatusCode.INTERNAL,
}
_ERRORS = {code: cls for cls, code in STATUS.items()}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for ``error``; anything unexpected is INTERNAL."""
    for cls, code in STATUS.items():
        if isinstance(error, cls):
            return code, str(error)
    if isinstance(error, PickScoreError):
        return grpc.StatusCode.INTERNAL, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def error_for(code: grpc.StatusCode | int | None, message: str) -> PickScoreError:
    """The domain error a status code (enum or its number, as in-band stream errors carry it) stands for."""
    if isinstance(code, int):
        code = _BY_NUMBER.get(code)
    return _ERRORS.get(code, PickScoreError)(message)
