"""Clients for a PickScore server (pickscore.v1.ScoringService), sync and asyncio.

    with Client("localhost:8001") as client:
        client.score("a cat in a hat", ["a.png", b"...jpeg bytes..."])        # [21.3, 19.8]
        client.rank("a cat in a hat", images, top_k=1).order                  # [0]
        scores, errors = client.score_many("a cat", million_paths, skip_invalid=True)   # streamed

    async with AsyncClient("localhost:8001") as client:
        await client.score("a cat", images)

    Client("scorer:8001", tls_ca="ca.pem", token="s3cret")                       # TLS, bearer token
    Client("scorer:8001", tls_ca="ca.pem", tls_cert="me.pem", tls_key="me.key")  # mutual TLS

``address`` is any gRPC target: ``host:port``, ``dns:///name:port`` (every address the name resolves to,
round robin), ``ipv4:10.0.0.1:8001,10.0.0.2:8001``. A call refused with UNAVAILABLE (a replica warming up
or draining) is retried on the next replica, up to 3 attempts. Images are paths (read here), encoded
bytes, or uint8 pixel arrays (H, W, 3) a generator already holds (sent raw: no encode, no decode; the
same score as a lossless PNG of them). Large calls are split into requests of at most the server's
``max_images_per_request``. Server errors come back as this package's domain errors (InvalidInput,
Overloaded, DeadlineExceeded, Unavailable, ...) with the server's message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np

from pickscore.errors import InvalidInput, PickScoreError
from pickscore.model.scoring import Ranking, check_top_k, rank_scores
from pickscore.status import error_for
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc

ImageRef = bytes | str | os.PathLike | np.ndarray  # encoded bytes, a file, or uint8 pixels (H, W[, 3 or 4])
DEFAULT_MESSAGE_BYTES = 64 << 20


def domain_error(e: grpc.RpcError) -> PickScoreError:
    """A gRPC failure as the domain error the server mapped it from."""
    return error_for(e.code(), f"server: {e.code().name}: {e.details()}", e.trailing_metadata() or ())


# Spread calls over every address the target resolves to (a headless Kubernetes Service answers with all
# ready replicas), and retry a call refused with UNAVAILABLE (a replica warming up or draining) on another:
# scoring has no side effects, so a retry is safe, and a rolling restart never reaches the caller.
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
                    "retryableStatusCodes": ["UNAVAILABLE"],
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
    ]


def _image(ref: ImageRef, id: str | None) -> pb.Image:
    if isinstance(ref, np.ndarray):  # sent as they are: no encoding here, no decoding there
        if ref.dtype != np.uint8 or ref.ndim not in (2, 3):
            raise InvalidInput(f"pixels must be uint8 (height, width[, channels]); got {ref.dtype} {ref.shape}")
        channels = 1 if ref.ndim == 2 else ref.shape[2]
        pixels = pb.Pixels(height=ref.shape[0], width=ref.shape[1], channels=channels, data=ref.tobytes())
        return pb.Image(pixels=pixels, id=id or "")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return pb.Image(data=bytes(ref), id=id or "")
    return pb.Image(data=Path(ref).read_bytes(), id=str(ref) if id is None else id)


def _images(refs: Sequence[ImageRef], ids: Sequence[str] | None) -> list[pb.Image]:
    if ids is not None and len(ids) != len(refs):
        raise InvalidInput(f"{len(ids)} ids for {len(refs)} images")
    return [_image(ref, None if ids is None else ids[i]) for i, ref in enumerate(refs)]


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _score_requests(
    images: Sequence[ImageRef],
    per_request: int,
    prompt: str = "",
    prompts: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
) -> list[pb.ScoreRequest]:
    """One prompt for all images, or ``prompts`` paired with them, split into requests of ``per_request`` images."""
    if prompts is not None and len(prompts) != len(images):
        raise InvalidInput(f"{len(prompts)} prompts for {len(images)} images")
    messages = _images(images, ids)
    return [
        pb.ScoreRequest(prompt=prompt, prompts=[] if prompts is None else prompts[part], images=messages[part])
        for part in _chunks(len(messages), per_request)
    ]


def _ranking(response: pb.RankResponse, n: int, top_k: int | None) -> Ranking:
    scores = np.zeros(n, np.float32)
    for r in response.ranking:
        scores[r.index] = r.score
    return rank_scores(scores, top_k)


def _stream_requests(prompt: str, refs: Iterable[ImageRef], per_request: int) -> Iterator[pb.ScoreStreamRequest]:
    """Tag = index of the request's first image; images read lazily, so memory stays bounded.

    Ids are the paths, or the image's position in the whole job for bytes, so errors name the item.
    """
    batch: list[pb.Image] = []
    start = 0
    for i, ref in enumerate(refs):
        batch.append(_image(ref, None if isinstance(ref, (str, os.PathLike)) else f"#{i}"))
        if len(batch) == per_request:
            yield pb.ScoreStreamRequest(tag=str(start), request=pb.ScoreRequest(prompt=prompt, images=batch))
            batch, start = [], i + 1
    if batch:
        yield pb.ScoreStreamRequest(tag=str(start), request=pb.ScoreRequest(prompt=prompt, images=batch))


def _collect(
    scores: np.ndarray, errors: dict[int, PickScoreError], response: pb.ScoreStreamResponse, skip_invalid: bool
) -> None:
    start = int(response.tag)
    if response.HasField("error"):
        error = error_for(response.error.code, f"server: {response.error.message}")
        if not skip_invalid:
            raise error
        errors[start] = error
        return
    for r in response.response.results:
        scores[start + r.index] = r.score


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise OSError(f"{what} {path}: cannot read it ({e.strerror or e})") from e


def channel_credentials(
    tls_ca: str | os.PathLike | None = None,
    tls_cert: str | os.PathLike | None = None,
    tls_key: str | os.PathLike | None = None,
) -> grpc.ChannelCredentials:
    """TLS from PEM files: ``tls_ca`` the roots to trust (the system's when None); ``tls_cert`` and ``tls_key``
    a client certificate, for a server that requires one (mutual TLS)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both for a client certificate, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=None if tls_ca is None else _read(tls_ca, "TLS CA file"),
        private_key=None if tls_key is None else _read(tls_key, "TLS key file"),
        certificate_chain=None if tls_cert is None else _read(tls_cert, "TLS certificate file"),
    )


class _Connection:
    """What both clients hold: a channel to ``address``, the stub, the default deadline and call metadata.

    TLS when ``tls`` is true or any of ``tls_ca`` (PEM roots to trust instead of the system's), ``tls_cert`` and
    ``tls_key`` (a client certificate and its key, for mutual TLS) is given; ``tls_server_name`` checks the
    server's certificate for that name instead of the address's host. ``token``: sent as
    ``authorization: Bearer TOKEN`` on every call.
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
        self._info: pb.GetModelInfoResponse | None = None


class Client(_Connection):
    """A blocking client. ``timeout`` (seconds) is the deadline of each call unless a call gives its own."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise domain_error(e) from None

    def model_info(self) -> pb.GetModelInfoResponse:
        if self._info is None:
            self._info = self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(), None)
        return self._info

    def score(
        self, prompt: str, images: Sequence[ImageRef], ids: Sequence[str] | None = None, timeout: float | None = None
    ) -> list[float]:
        """PickScore of each image for the prompt, in input order."""
        requests = _score_requests(images, self.model_info().max_images_per_request, prompt=prompt, ids=ids)
        return [r.score for request in requests for r in self._call(self.stub.Score, request, timeout).results]

    def score_pairs(
        self, prompts: Sequence[str], images: Sequence[ImageRef], timeout: float | None = None
    ) -> list[float]:
        """prompts[i] against images[i]."""
        requests = _score_requests(images, self.model_info().max_images_per_request, prompts=prompts)
        return [r.score for request in requests for r in self._call(self.stub.Score, request, timeout).results]

    def rank(
        self, prompt: str, images: Sequence[ImageRef], top_k: int | None = None, timeout: float | None = None
    ) -> Ranking:
        """Best first (``top_k`` long if given), scores and softmax probabilities over all candidates."""
        check_top_k(top_k)
        response = self._call(self.stub.Rank, pb.RankRequest(prompt=prompt, images=_images(images, None)), timeout)
        return _ranking(response, len(images), top_k)

    def score_many(
        self,
        prompt: str,
        images: Iterable[ImageRef],
        per_request: int = 0,
        skip_invalid: bool = False,
        timeout: float | None = None,
    ) -> tuple[np.ndarray, dict[int, PickScoreError]]:
        """Many images over one ScoreStream -> (scores (N,), errors by first index of the failed request).

        ``per_request`` images per request (default 1 with ``skip_invalid``, so a bad image costs only itself;
        else the server's maximum). Without ``skip_invalid`` the first failed request raises.
        """
        refs = list(images)
        per_request = per_request or (1 if skip_invalid else self.model_info().max_images_per_request)
        scores = np.full(len(refs), np.nan, np.float32)
        errors: dict[int, PickScoreError] = {}
        try:
            for response in self.stub.ScoreStream(
                _stream_requests(prompt, refs, per_request), timeout=timeout, metadata=self.metadata
            ):
                _collect(scores, errors, response, skip_invalid)
        except grpc.RpcError as e:
            raise domain_error(e) from None
        return scores, errors


class AsyncClient(_Connection):
    """The asyncio twin of ``Client`` (same methods, awaited)."""

    _open = staticmethod(grpc.aio.insecure_channel)
    _open_secure = staticmethod(grpc.aio.secure_channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method, request, timeout: float | None):
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise domain_error(e) from None

    async def model_info(self) -> pb.GetModelInfoResponse:
        if self._info is None:
            self._info = await self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(), None)
        return self._info

    async def score(
        self, prompt: str, images: Sequence[ImageRef], ids: Sequence[str] | None = None, timeout: float | None = None
    ) -> list[float]:
        requests = _score_requests(images, (await self.model_info()).max_images_per_request, prompt=prompt, ids=ids)
        return [r.score for request in requests for r in (await self._call(self.stub.Score, request, timeout)).results]

    async def score_pairs(
        self, prompts: Sequence[str], images: Sequence[ImageRef], timeout: float | None = None
    ) -> list[float]:
        requests = _score_requests(images, (await self.model_info()).max_images_per_request, prompts=prompts)
        return [r.score for request in requests for r in (await self._call(self.stub.Score, request, timeout)).results]

    async def rank(
        self, prompt: str, images: Sequence[ImageRef], top_k: int | None = None, timeout: float | None = None
    ) -> Ranking:
        check_top_k(top_k)
        response = await self._call(
            self.stub.Rank, pb.RankRequest(prompt=prompt, images=_images(images, None)), timeout
        )
        return _ranking(response, len(images), top_k)

    async def score_many(
        self,
        prompt: str,
        images: Iterable[ImageRef],
        per_request: int = 0,
        skip_invalid: bool = False,
        timeout: float | None = None,
    ) -> tuple[np.ndarray, dict[int, PickScoreError]]:
        refs = list(images)
        per_request = per_request or (1 if skip_invalid else (await self.model_info()).max_images_per_request)
        scores = np.full(len(refs), np.nan, np.float32)
        errors: dict[int, PickScoreError] = {}
        try:
            async for response in self.stub.ScoreStream(
                _stream_requests(prompt, refs, per_request), timeout=timeout, metadata=self.metadata
            ):
                _collect(scores, errors, response, skip_invalid)
        except grpc.RpcError as e:
            raise domain_error(e) from None
        return scores, errors
