"""Clients for a PickScore server (pickscore.v1.ScoringService), sync and asyncio.

    with Client("localhost:8001") as client:
        client.score("a cat in a hat", ["a.png", b"...jpeg bytes..."])        # [21.3, 19.8]
        client.rank("a cat in a hat", images, top_k=1).order                  # [0]
        scores, errors = client.score_many("a cat", million_paths, skip_invalid=True)   # streamed

    async with AsyncClient("localhost:8001") as client:
        await client.score("a cat", images)

    with Client("localhost:8001", model="other") as client:                   # one of the server's models
        client.list_models()                                                  # every model it serves
        client.rewards("a cat", images, models={"pickscore": 1.0, "other": 0.5}).rewards   # weighted sum

    Client("scorer:8001", tls_ca="ca.pem", token="s3cret")                       # TLS, bearer token
    Client("scorer:8001", tls_ca="ca.pem", tls_cert="me.pem", tls_key="me.key")  # mutual TLS

``address`` is any gRPC target: ``host:port``, ``dns:///name:port`` (every address the name resolves to,
round robin), ``ipv4:10.0.0.1:8001,10.0.0.2:8001``. A call refused with UNAVAILABLE (a replica warming up
or draining) is retried on the next replica, up to 3 attempts. Images are paths (read here), encoded
bytes, or uint8 pixel arrays (H, W, 3) a generator already holds (sent raw: no encode, no decode; the
same score as a lossless PNG of them). Large calls are split into requests of at most the server's
``max_images_per_request``. Server errors come back as this package's domain errors (InvalidInput,
Overloaded, DeadlineExceeded, Unavailable, NotFound for a model the server does not serve, ...) with the
server's message. ``model`` (every client, ``RewardClient`` too): which of the server's models scores (empty:
its default).

Modules: ``sync`` (Client), ``aio`` (AsyncClient), ``reward`` (RewardClient and the senders of its batches),
``channel`` (the gRPC channel both clients hold), ``wire`` (scoring.v1 messages to and from a caller's images).
"""

from pickscore.client.aio import AsyncClient
from pickscore.client.channel import DEFAULT_MESSAGE_BYTES
from pickscore.client.reward import RewardClient
from pickscore.client.sync import Client
from pickscore.client.wire import ImageRef, ModelRewards, Rewards, domain_error

__all__ = [
    "DEFAULT_MESSAGE_BYTES",
    "AsyncClient",
    "Client",
    "ImageRef",
    "ModelRewards",
    "RewardClient",
    "Rewards",
    "domain_error",
]
