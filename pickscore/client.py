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

import asyncio
import json
import os
import random
import re
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

import grpc
import numpy as np

from pickscore.errors import InvalidInput, Overloaded, PickScoreError, Unavailable
from pickscore.model.scoring import Ranking, check_top_k, rank_scores
from pickscore.status import error_for, error_for_http
from pickscore.tls import channel_credentials, ssl_context
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc

ImageRef = bytes | str | os.PathLike | np.ndarray  # encoded bytes, a file, or uint8 pixels (H, W[, 3 or 4])
DEFAULT_MESSAGE_BYTES = 64 << 20
# How a server's refusal names the image of its request: "image 3", after "server: CODE: " or "server: HTTP 400: ".
_ITEM = re.compile(r"^(server: (?:[A-Z_]+: |HTTP \d+: )?)?image (\d+)")


def domain_error(e: grpc.RpcError) -> PickScoreError:
    """A gRPC failure as the domain error the server mapped it from."""
    return error_for(e.code(), f"server: {e.code().name}: {e.details()}", e.trailing_metadata() or ())


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


def _renumbered(error: PickScoreError, offset: int) -> PickScoreError:
    """An InvalidInput naming image K of a request that began at the caller's image ``offset``, as image offset + K:
    an image is named by its place in the caller's call, not in the request it was sent in."""
    if not offset or not isinstance(error, InvalidInput):
        return error
    return InvalidInput(_ITEM.sub(lambda m: f"{m[1] or ''}image {offset + int(m[2])}", str(error), count=1))


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
        error = _renumbered(error_for(response.error.code, f"server: {response.error.message}"), start)
        if not skip_invalid:
            raise error
        errors[start] = error
        return
    for r in response.response.results:
        scores[start + r.index] = r.score


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

    def _scores(self, requests: list[pb.ScoreRequest], timeout: float | None) -> list[float]:
        """The scores of every request's images, in order; a refusal names the image by its place in all of them."""
        out: list[float] = []
        for request in requests:
            try:
                out += [r.score for r in self._call(self.stub.Score, request, timeout).results]
            except InvalidInput as e:
                raise _renumbered(e, len(out)) from None
        return out

    def score(
        self, prompt: str, images: Sequence[ImageRef], ids: Sequence[str] | None = None, timeout: float | None = None
    ) -> list[float]:
        """PickScore of each image for the prompt, in input order."""
        requests = _score_requests(images, self.model_info().max_images_per_request, prompt=prompt, ids=ids)
        return self._scores(requests, timeout)

    def score_pairs(
        self, prompts: Sequence[str], images: Sequence[ImageRef], timeout: float | None = None
    ) -> list[float]:
        """prompts[i] against images[i]."""
        requests = _score_requests(images, self.model_info().max_images_per_request, prompts=prompts)
        return self._scores(requests, timeout)

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
        """Many images over one ScoreStream -> (scores (N,), errors by first index of the failed request; each
        names its image by its place in ``images``, as in-process scoring does).

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

    async def _scores(self, requests: list[pb.ScoreRequest], timeout: float | None) -> list[float]:
        out: list[float] = []
        for request in requests:
            try:
                out += [r.score for r in (await self._call(self.stub.Score, request, timeout)).results]
            except InvalidInput as e:
                raise _renumbered(e, len(out)) from None
        return out

    async def score(
        self, prompt: str, images: Sequence[ImageRef], ids: Sequence[str] | None = None, timeout: float | None = None
    ) -> list[float]:
        requests = _score_requests(images, (await self.model_info()).max_images_per_request, prompt=prompt, ids=ids)
        return await self._scores(requests, timeout)

    async def score_pairs(
        self, prompts: Sequence[str], images: Sequence[ImageRef], timeout: float | None = None
    ) -> list[float]:
        requests = _score_requests(images, (await self.model_info()).max_images_per_request, prompts=prompts)
        return await self._scores(requests, timeout)

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


class RewardClient:
    """Rewards for RL trainers: submit images as they are generated, collect scores later.

        with RewardClient("localhost:8001") as rewards:            # gRPC; "http://host:8000" for HTTP
            futures = [rewards.submit(prompt, image) for prompt, image in generator()]   # returns at once
            rewards_ = [f.result() for f in futures]              # floats (concurrent.futures.Future)
            probs = rewards.submit_group(prompt, images, softmax=True).result()   # (N,) per-group softmax

    Submitted images are sent in batches of up to ``max_batch`` (or whatever arrived within ``max_delay_s`` of
    the first), each batch one request of prompt-image pairs, at most ``max_inflight`` requests at a time, on
    a background thread: scoring overlaps with generation. Refusals (RESOURCE_EXHAUSTED / 429, following the
    server's retry hint) and unavailability (UNAVAILABLE / 503) are retried with exponential backoff for up to
    ``timeout`` seconds; a batch refused for one bad image is split so only that image fails. When the
    reward cannot be had, ``required=True`` fails the futures with the domain error; ``required=False``
    resolves them to 0.0 with a warning (training goes on without that reward). ``scale``: "raw" PickScore,
    or "div26" (score / 26, a scale RL code for diffusion models commonly uses). Images: encoded bytes, paths,
    uint8 arrays (H, W, 3), or PIL images. In asyncio code, ``await asyncio.wrap_future(future)``.
    """

    SCALES = ("raw", "div26")

    def __init__(
        self,
        address: str,
        *,
        max_batch: int = 32,
        max_delay_s: float = 0.01,
        max_inflight: int = 4,
        timeout: float = 120.0,
        required: bool = True,
        scale: str = "raw",
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **tls,
    ):
        if scale not in self.SCALES:
            raise ValueError(f"scale {scale!r}; one of {', '.join(self.SCALES)}")
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("max_batch and max_inflight must be at least 1")
        self.address = address
        self.max_batch, self.max_delay_s, self.max_inflight = max_batch, max_delay_s, max_inflight
        self.timeout, self.required, self.scale = timeout, required, scale
        self._token, self._metadata, self._tls = token, tuple(metadata), tls
        self._http = address.startswith(("http://", "https://"))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pickscore-rewards", daemon=True)
        self._thread.start()
        self._pending: list = []
        self._arrived = asyncio.Event()
        self._closed = False
        self._main = asyncio.run_coroutine_threadsafe(self._batches(), self._loop)

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, prompt: str, image: ImageRef | object):
        """The reward of ``image`` for ``prompt``: a concurrent.futures.Future of a float."""
        if self._closed:
            raise RuntimeError("RewardClient is closed")
        future: Future = Future()
        item = (prompt, _reward_image(image), future)
        self._loop.call_soon_threadsafe(self._enqueue, item)
        return future

    def submit_group(self, prompt: str, images: Sequence, softmax: bool = False):
        """One prompt's group (GRPO): a Future of the (N,) rewards, or of the softmax of their raw scores (the
        probability that each image is preferred) when ``softmax``."""
        parts = [self.submit(prompt, image) for image in images]
        group: Future = Future()
        left = [len(parts)]

        def done(_) -> None:
            left[0] -= 1
            if left[0]:
                return
            failed = [k for k, p in enumerate(parts) if p.exception() is not None]
            if failed:  # an image alone in its request was "image 0" there: name it by its place in the group
                group.set_exception(_renumbered(parts[failed[0]].exception(), failed[0]))
                return
            values = np.array([p.result() for p in parts], np.float64)
            if softmax:  # over the raw scores, whatever the scale: the paper's ranking probabilities
                values *= 26 if self.scale == "div26" else 1
                values = np.exp(values - values.max())
                values /= values.sum()
            group.set_result(values.astype(np.float32))

        for part in parts:
            part.add_done_callback(done)
        return group

    def close(self) -> None:
        """Send what is pending, wait for it, and stop the background thread."""
        if self._closed:
            return
        self._closed = True
        self._loop.call_soon_threadsafe(self._arrived.set)
        self._main.result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # On the background loop -------------------------------------------------------------------------------

    def _enqueue(self, item) -> None:
        self._pending.append(item)
        self._arrived.set()

    async def _batches(self) -> None:
        sender = _HttpScorer(self) if self._http else _GrpcScorer(self)
        slots = asyncio.Semaphore(self.max_inflight)
        tasks: set[asyncio.Task] = set()
        try:
            while not (self._closed and not self._pending):
                if not self._pending:
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                close_at = asyncio.get_running_loop().time() + self.max_delay_s
                while len(self._pending) < self.max_batch and not self._closed:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), close_at - asyncio.get_running_loop().time())
                    except asyncio.TimeoutError:
                        break
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                await slots.acquire()
                task = asyncio.create_task(self._send(sender, batch))
                tasks.add(task)
                task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))
            await asyncio.gather(*tasks)
        finally:
            await sender.close()

    async def _send(self, sender, batch: list) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.timeout
        attempt = 0
        while True:
            try:
                scores = await sender.score([p for p, _, _ in batch], [i for _, i, _ in batch], give_up - loop.time())
                break
            except InvalidInput as e:
                if len(batch) > 1:  # find the bad one: each image alone, so only it fails
                    await asyncio.gather(*(self._send(sender, [item]) for item in batch))
                    return
                error: Exception = e
            except (Overloaded, Unavailable) as e:
                hint = getattr(e, "retry_after_s", None)
                wait = hint if hint else min(5.0, 0.05 * 2**attempt) * (0.5 + random.random())
                attempt += 1
                if loop.time() + wait < give_up:
                    await asyncio.sleep(wait)
                    continue
                error = e
            except Exception as e:  # noqa: BLE001 - handed to the caller (or warned about), not lost
                error = e
            if self.required:
                for _, _, future in batch:
                    future.set_exception(error)
            else:
                warnings.warn(f"PickScore reward unavailable, {len(batch)} images scored 0: {error}", stacklevel=1)
                for _, _, future in batch:
                    future.set_result(0.0)
            return
        for (_, _, future), score in zip(batch, scores):
            future.set_result(float(score) / 26 if self.scale == "div26" else float(score))


def _reward_image(image) -> ImageRef:
    if isinstance(image, (bytes, bytearray, memoryview, np.ndarray, str, os.PathLike)):
        return bytes(image) if isinstance(image, (bytearray, memoryview)) else image
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image: its RGB pixels, no re-encoding
        return np.asarray(image.convert("RGB"))
    raise InvalidInput(f"an image must be bytes, a path, a uint8 array or a PIL image; got {type(image).__name__}")


class _GrpcScorer:
    def __init__(self, owner: RewardClient):
        self.client = AsyncClient(owner.address, metadata=owner._metadata, token=owner._token, **owner._tls)

    async def score(self, prompts: list[str], images: list[ImageRef], timeout: float) -> list[float]:
        return await self.client.score_pairs(prompts, images, timeout=max(timeout, 0.001))

    async def close(self) -> None:
        await self.client.close()


class _HttpScorer:
    """POST /v1/score in msgpack (images raw, never base64)."""

    def __init__(self, owner: RewardClient):
        self.url = owner.address.rstrip("/") + "/v1/score"
        self.headers = {"Content-Type": "application/msgpack", **dict(owner._metadata)}
        if owner._token:
            self.headers["authorization"] = f"Bearer {owner._token}"
        self.ssl = ssl_context(owner._tls.get("tls_ca"), owner._tls.get("tls_cert"), owner._tls.get("tls_key"))
        self.session = None

    async def score(self, prompts: list[str], images: list[ImageRef], timeout: float) -> list[float]:
        import aiohttp
        import msgpack

        if self.session is None:
            self.session = aiohttp.ClientSession()
        body = msgpack.packb({"prompts": prompts, "images": [_plain_image(i) for i in images]})
        headers = {**self.headers, "timeout": f"{max(timeout, 0.001):.3f}"}
        try:
            async with self.session.post(
                self.url, data=body, headers=headers, ssl=self.ssl, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r:
                payload = msgpack.unpackb(await r.read()) if r.content_type == "application/msgpack" else {}
                if r.status == 200:
                    return [result["score"] for result in payload["results"]]
                hint = r.headers.get("retry-after-ms") or (
                    str(float(r.headers["Retry-After"]) * 1000) if "Retry-After" in r.headers else None
                )
                message = f"server: HTTP {r.status}: {payload.get('error', r.reason)}"
                raise error_for_http(r.status, message, None if hint is None else float(hint) / 1000)
        except aiohttp.ClientError as e:
            raise Unavailable(f"{self.url}: {type(e).__name__}: {e}") from e

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _plain_image(ref: ImageRef) -> dict:
    """An image as /v1/score's msgpack form: the fields of scoring.v1's Image, bytes raw."""
    message = _image(ref, None)
    if message.HasField("pixels"):
        p = message.pixels
        return {"pixels": {"height": p.height, "width": p.width, "channels": p.channels, "data": p.data}}
    return {"data": message.data, "id": message.id}
