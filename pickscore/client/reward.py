"""The reward client for RL trainers, and the senders of its batches: scoring.v1 over gRPC, or /v1/score (one model)
and /v1/rewards (several, weighted) over HTTP."""

from __future__ import annotations

import asyncio
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from pickscore.client.aio import AsyncClient
from pickscore.client.fleet import Fleet, Served
from pickscore.client.http import post_msgpack
from pickscore.client.wire import ImageRef, Weights, image_message, model_weights, normalize_of, renumbered
from pickscore.errors import Conflict, InvalidInput, PickScoreError
from pickscore.model import scoring
from pickscore.tls import ssl_context


class RewardClient:
    """Rewards for RL trainers: submit images as they are generated, collect scores later.

        with RewardClient("localhost:8001") as rewards:            # gRPC; "http://host:8000" for HTTP
            futures = [rewards.submit(prompt, image) for prompt, image in generator()]   # returns at once
            rewards_ = [f.result() for f in futures]              # floats (concurrent.futures.Future)
            probs = rewards.submit_group(prompt, images, softmax=True).result()   # (N,) per-group softmax

    Submitted images are sent in batches of up to ``max_batch`` (or whatever arrived within ``max_delay_s`` of
    the first), each batch one request of prompt-image pairs, at most ``max_inflight`` requests at a time on each
    server, on a background thread: scoring overlaps with generation. Refusals (RESOURCE_EXHAUSTED / 429,
    following the server's retry hint) and unavailability (UNAVAILABLE / 503) are retried with exponential backoff
    for up to ``timeout`` seconds; a batch refused for one bad image is split so only that image fails. When the
    reward cannot be had, ``required=True`` fails the futures with the domain error; ``required=False``
    resolves them to 0.0 with a warning (training goes on without that reward).

    Several replicas: ``address`` may be a list of addresses, or a DNS name each of whose addresses is a replica
    (``dns:///host:port`` for gRPC, ``dns+http://host:port`` for HTTP; resolved again every 30 s). Each batch goes
    to the replica with the least outstanding work; a replica that fails is taken out and its batches go to the
    others, and it is tried again with backoff, one batch at a time (``pickscore.client.fleet``). Before the first
    batch every replica is asked which model it serves; replicas serving different models (a half-finished
    rollout) fail every future with Conflict naming what each serves, ``required`` or not, unless
    ``expect_model`` names the identity (``GET /v1/model``'s ``identity``, or its digest) to use: then only the
    replicas serving it are used. ``scale``: "raw" PickScore,
    or "div26" (score / 26, a scale RL code for diffusion models commonly uses). Images: encoded bytes, paths,
    uint8 arrays (H, W, 3), or PIL images. In asyncio code, ``await asyncio.wrap_future(future)``.

    Which model: ``model`` names one of the server's models (empty: its default). Or ``models`` ({name: weight})
    makes each reward the server's weighted sum of those models' scores (scoring.v1's Rewards; /v1/rewards over
    HTTP), each score first normalised as ``normalize`` says: "none", "declared" (the model's declared map) or
    "running" (the server's statistics of that model's scores). ``scale`` then applies to that sum.
    """

    SCALES = ("raw", "div26")

    def __init__(
        self,
        address: str | Sequence[str],
        *,
        max_batch: int = 32,
        max_delay_s: float = 0.01,
        max_inflight: int = 4,
        timeout: float = 120.0,
        required: bool = True,
        scale: str = "raw",
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        model: str = "",
        models: Weights | None = None,
        normalize: str = "none",
        expect_model: str | Sequence[str] = (),
        **tls,
    ):
        if model and models is not None:
            raise ValueError("give model (one model's scores) or models (a weighted sum of several), not both")
        if models is None and normalize_of(normalize) != "none":
            raise ValueError(f"normalize {normalize!r} applies to the scores of models=...; give models")
        if scale not in self.SCALES:
            raise ValueError(f"scale {scale!r}; one of {', '.join(self.SCALES)}")
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("max_batch and max_inflight must be at least 1")
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.max_batch, self.max_delay_s, self.max_inflight = max_batch, max_delay_s, max_inflight
        self.timeout, self.required, self.scale = timeout, required, scale
        self._token, self._metadata, self._tls = token, tuple(metadata), tls
        self.model, self.normalize = model, normalize_of(normalize)
        self.models = None if models is None else model_weights(models)  # (name, weight) pairs
        names = [model] if self.models is None else [name for name, _ in self.models]
        expect = expect_model.split(",") if isinstance(expect_model, str) and expect_model else list(expect_model)
        connection = {"token": token, "metadata": self._metadata, **tls}
        self._fleet = Fleet(self.addresses, self._sender, names, connection, expect=expect, per_replica=max_inflight)
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
        if not parts:  # an empty group has its (0,) answer at once: no part will ever call back
            group.set_result(np.zeros(0, np.float32))
            return group
        left = [len(parts)]

        def done(_) -> None:
            left[0] -= 1
            if left[0]:
                return
            failed = [k for k, p in enumerate(parts) if p.exception() is not None]
            if failed:  # an image alone in its request was "image 0" there: name it by its place in the group
                group.set_exception(renumbered(parts[failed[0]].exception(), failed[0]))
                return
            values = np.array([p.result() for p in parts], np.float64)
            if softmax:  # over the raw scores, whatever the scale: the paper's ranking probabilities
                group.set_result(scoring.softmax(values * (26 if self.scale == "div26" else 1)))
            else:
                group.set_result(values.astype(np.float32))

        for part in parts:
            part.add_done_callback(done)
        return group

    def served(self) -> dict[str, Served]:
        """What the replicas serve under each model name asked (source and identity), every replica asked once:
        Unavailable when none answers, Conflict when they serve different models (see ``expect_model``)."""
        return asyncio.run_coroutine_threadsafe(self._fleet.ready(), self._loop).result()

    def replicas(self) -> dict[str, dict[str, Any]]:
        """Each replica's rows answered, failures in a row and whether it is left out, by address."""
        return asyncio.run_coroutine_threadsafe(_now(self._fleet.report), self._loop).result()

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

    def _sender(self, address: str, tls_server_name: str | None):
        http = address.startswith(("http://", "https://"))
        return (_HttpBatchSender if http else _GrpcBatchSender)(self, address, tls_server_name)

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        try:
            while not (self._closed and not self._pending):
                if not self._pending:
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                close_at = loop.time() + self.max_delay_s
                while len(self._pending) < self.max_batch and not self._closed:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), close_at - loop.time())
                    except asyncio.TimeoutError:
                        break
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                give_up = loop.time() + self.timeout
                try:  # waits for a replica with room: what arrives meanwhile makes the next batch fuller
                    await self._fleet.ready(give_up)
                    replica = await self._fleet.lease(give_up)
                except PickScoreError as e:
                    self._fail(batch, e)
                    continue
                task = asyncio.create_task(self._send(batch, give_up, replica))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            await self._fleet.close()

    async def _send(self, batch: list, give_up: float, replica=None) -> None:
        prompts, images = [p for p, _, _ in batch], [i for _, i, _ in batch]
        try:
            scores = await self._fleet.call(
                len(batch), lambda sender, timeout: sender.score(prompts, images, timeout), give_up, replica
            )
        except InvalidInput as e:
            if len(batch) > 1:  # find the bad one: each image alone, so only it fails
                await asyncio.gather(*(self._send([item], give_up) for item in batch))
                return
            self._fail(batch, e)
            return
        except Exception as e:  # noqa: BLE001 - handed to the caller (or warned about), not lost
            self._fail(batch, e)
            return
        for (_, _, future), score in zip(batch, scores):
            future.set_result(float(score) / 26 if self.scale == "div26" else float(score))

    def _fail(self, batch: list, error: Exception) -> None:
        """The reward cannot be had: the futures fail (``required``, or a fleet of mixed models: never scored as 0),
        or resolve to 0.0 with a warning."""
        if self.required or isinstance(error, Conflict):
            for _, _, future in batch:
                future.set_exception(error)
        else:
            warnings.warn(f"PickScore reward unavailable, {len(batch)} images scored 0: {error}", stacklevel=1)
            for _, _, future in batch:
                future.set_result(0.0)


async def _now(function):
    return function()


def _reward_image(image) -> ImageRef:
    if isinstance(image, (bytes, bytearray, memoryview, np.ndarray, str, os.PathLike)):
        return bytes(image) if isinstance(image, (bytearray, memoryview)) else image
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image: its RGB pixels, no re-encoding
        return np.asarray(image.convert("RGB"))
    raise InvalidInput(f"an image must be bytes, a path, a uint8 array or a PIL image; got {type(image).__name__}")


class _GrpcBatchSender:
    """Sends a RewardClient's batches as scoring.v1 Score requests of prompt-image pairs (its model), or Rewards
    requests (its models), on an AsyncClient."""

    def __init__(self, owner: RewardClient, address: str, tls_server_name: str | None = None):
        self.models, self.normalize = owner.models, owner.normalize
        tls = {**owner._tls, "tls_server_name": tls_server_name}  # the fleet's choice (a DNS name's, or the caller's)
        self.client = AsyncClient(address, metadata=owner._metadata, token=owner._token, model=owner.model, **tls)

    async def score(self, prompts: list[str], images: list[ImageRef], timeout: float) -> list[float]:
        timeout = max(timeout, 0.001)
        if self.models is None:
            return await self.client.score_pairs(prompts, images, timeout=timeout)
        answer = await self.client.rewards("", images, self.models, self.normalize, prompts=prompts, timeout=timeout)
        return answer.rewards.tolist()

    async def close(self) -> None:
        await self.client.close()


class _HttpBatchSender:
    """Sends a RewardClient's batches as POST /v1/score (its model) or /v1/rewards (its models) in msgpack (images
    raw, never base64)."""

    def __init__(self, owner: RewardClient, address: str, tls_server_name: str | None = None):
        self.url = address.rstrip("/") + ("/v1/score" if owner.models is None else "/v1/rewards")
        if owner.models is None:  # what each body carries besides its prompts and images
            self.fields: dict = {"model": owner.model} if owner.model else {}
        else:
            models = [{"model": name, "weight": weight} for name, weight in owner.models]
            self.fields = {"models": models, "normalize": owner.normalize}
        self.headers = {"Content-Type": "application/msgpack", **dict(owner._metadata)}
        if owner._token:
            self.headers["authorization"] = f"Bearer {owner._token}"
        self.ssl = ssl_context(owner._tls.get("tls_ca"), owner._tls.get("tls_cert"), owner._tls.get("tls_key"))
        self.server_name = tls_server_name
        self.session = None

    async def score(self, prompts: list[str], images: list[ImageRef], timeout: float) -> list[float]:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession()
        fields = {"prompts": prompts, "images": [_plain_image(i) for i in images], **self.fields}
        payload = await post_msgpack(self.session, self.url, fields, self.headers, self.ssl, timeout, self.server_name)
        return payload["rewards"] if "rewards" in payload else [x["score"] for x in payload["results"]]

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


def _plain_image(ref: ImageRef) -> dict:
    """An image as /v1/score's msgpack form: the fields of scoring.v1's Image, bytes raw."""
    message = image_message(ref, None)
    if message.HasField("pixels"):
        p = message.pixels
        return {"pixels": {"height": p.height, "width": p.width, "channels": p.channels, "data": p.data}}
    return {"data": message.data, "id": message.id}
