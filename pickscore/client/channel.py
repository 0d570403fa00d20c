"""The channel both gRPC clients hold: round robin over every address of the target, retries of refused calls,
TLS and a bearer token."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import grpc

from pickscore.tls import channel_credentials
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc

DEFAULT_MESSAGE_BYTES = 64 << 20

# Spread calls over every address the target resolves to (a headless Kubernetes Service answers with all
# ready replicas), and retry a call refused with UNAVAILABLE (a replica warming up or draining) on another:
# scoring has no side effects, so a retry is safe, and a rolling restart never reaches the caller. CANCELLED too:
# a server that shuts down answers calls no handler took yet with it (grpc/grpc#41785), and a channel never
# retries a call its own caller cancelled.
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": pb.DESCRIPTOR.services_by_name["ScoringService"].full_name}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ],
    }
)


def _options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", _SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        # A connection of its own per client rather than one shared by every channel of the process to the same
        # target: a server with front ends (serve --front-ends) is spread over by connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]


class Connection:
    """What both clients hold: a channel to ``address``, the stub, the default deadline and call metadata.

    TLS when ``tls`` is true or any of ``tls_ca`` (PEM roots to trust instead of the system's), ``tls_cert`` and
    ``tls_key`` (a client certificate and its key, for mutual TLS) is given; ``tls_server_name`` checks the
    server's certificate for that name instead of the address's host. ``token``: sent as
    ``authorization: Bearer TOKEN`` on every call. ``model``: the served model every Score, Rank, ScoreStream and
    GetModelInfo request names (empty: the server's default model).
    """

    _open = staticmethod(grpc.insecure_channel)  # the asyncio client opens grpc.aio channels
    _open_secure = staticmethod(grpc.secure_channel)

    def __init__(
        self,
        address: str,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MESSAGE_BYTES,
        metadata: Sequence[tuple[str, str]] = (),
        *,
        tls: bool = False,
        tls_ca: str | os.PathLike | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        model: str = "",
    ):
        options = _options(max_message_bytes)
        if tls or tls_ca is not None or tls_cert is not None or tls_key is not None:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            credentials = channel_credentials(tls_ca, tls_cert, tls_key)
            self.channel = self._open_secure(address, credentials, options=options)
        else:
            self.channel = self._open(address, options=options)
        self.stub = scoring_pb2_grpc.ScoringServiceStub(self.channel)
        self.timeout = timeout
        self.metadata = tuple(metadata) + ((("authorization", f"Bearer {token}"),) if token else ())
        self.model = model
        self._info: pb.GetModelInfoResponse | None = None
