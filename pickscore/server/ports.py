"""The server's ports (gRPC, HTTP, metrics) are bound before the model loads: a busy or forbidden one stops the
start at once, in one line naming the port and the setting that chose it, not after the model has loaded.

    sock = listen("0.0.0.0", 8000, "http_port")   # held, then handed to the HTTP server once the model is ready
    raise unbindable(host, port, "port", why_not(host, port) or grpc_error)
"""

from __future__ import annotations

import errno
import socket

from pickscore.flags import flag_name
from pickscore.server.settings import env_name

NAMES = {"port": "gRPC", "http_port": "HTTP", "metrics_port": "metrics"}


def listen(host: str, port: int, setting: str, share: bool = False) -> socket.socket:
    """A listening TCP socket on host:port (the first address ``host`` resolves to); OSError naming the port.
    ``share``: with SO_REUSEPORT, beside a server's other front ends on the same port (``reserve``)."""
    try:
        return _listen(host, port, share)
    except OSError as e:
        raise unbindable(host, port, setting, e) from None


def reserve(host: str, port: int, setting: str) -> socket.socket:
    """The port a server's front ends will share (0: a free one), bound with SO_REUSEPORT but not listening, so it
    takes no connections: held while they start. OSError naming the port when something else listens there."""
    if busy := why_not(host, port):
        raise unbindable(host, port, setting, busy)
    try:
        return _listen(host, port, share=True, backlog=None)
    except OSError as e:
        raise unbindable(host, port, setting, e) from None


def why_not(host: str, port: int) -> OSError | None:
    """Why host:port cannot be bound now, or None: for servers (gRPC) that report only that they could not."""
    try:
        _listen(host, port).close()
    except OSError as e:
        return e
    return None


def unbindable(host: str, port: int, setting: str, reason: BaseException) -> OSError:
    """The one-line error for a port that could not be bound: which port, which setting, why, what to do."""
    why = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    if isinstance(reason, OSError) and reason.errno == errno.EADDRINUSE:
        why += ": another process listens there; stop it or choose another port (0 picks a free one)"
    return OSError(f"{NAMES[setting]} port {host}:{port} ({flag_name(setting)} or {env_name(setting)}): {why}")


def _listen(host: str, port: int, share: bool = False, backlog: int | None = 128) -> socket.socket:
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = found[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as every server here: TIME_WAIT is no conflict
        if share:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if backlog is not None:
            sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
