"""Several of the servers' models at once, for ``batch`` and ``evaluate-models`` with ``--model-name a,b``.

    with ModelsOnServers(["host:8001"], 600.0, {}, ["pickscore", "other"]) as place:
        scores, errors = place.score_all("a cat", ["a.png", b"..."], skip_invalid=True)   # scores (N, 2)

A place like ``places.OnServers`` (same ways in: ``score_all``, ``prepare``/``complete``), whose scores are
(N, models): each request of up to ``CHUNK`` prompt-image pairs is ONE scoring.v1 ``Rewards`` call (gRPC, by
``AsyncClient.rewards``) or ``POST /v1/rewards`` (HTTP, msgpack, images raw) naming every model, so the server
decodes each image once for all of them; each model's raw ``scores`` are read (weights 1, no normalisation: the
weighted sum is not used). Requests go to the servers as a ``pickscore.client.fleet.Fleet`` sends them (the one with
the least outstanding work, ``INFLIGHT`` at a time on each, a failed server's requests to the others, refusals
retried with the server's hint) on a background event loop, for up to ``timeout`` seconds; a request refused for a
bad image is split into one request per image, so only that image fails, named as ``OnServers`` names it. A failure
that is not the image's (every server out, a model the servers do not serve) raises. Every server must serve the
same model under each name (or the identities ``expect_model`` names).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from pickscore.errors import InvalidInput, PickScoreError, describe_item, item_reason, item_renamed

if TYPE_CHECKING:
    from pickscore.client.fleet import Fleet, Served
    from pickscore.datasets import Row

CHUNK = 32  # prompt-image pairs a request (RewardClient's batches are as large)
INFLIGHT = 4  # requests in flight to each address

Answer = tuple[np.ndarray, dict[int, PickScoreError]]  # (n, models) scores, NaN where failed; errors by position


class ModelsOnServers:
    """Running servers (gRPC ``host:port`` or HTTP ``http[s]://host:port``) scoring with each of ``names``, each
    request one Rewards call. Nothing is dialled until the first use."""

    def __init__(
        self,
        servers: Sequence[str],
        timeout: float,
        connection: dict[str, Any],
        names: Sequence[str],
        expect_model: str = "",
    ):
        if len(names) < 1 or not servers:
            raise ValueError("ModelsOnServers needs servers and at least one model name")
        self.servers, self.timeout = list(servers), timeout
        self.connection = connection
        self.names = list(names)
        self.expect_model = expect_model
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._fleet: Fleet | None = None

    def __enter__(self) -> ModelsOnServers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def served(self) -> dict[str, Served]:
        """What the servers serve under each name (every server asked once): Unavailable naming every address when
        none answers, NotFound naming the model when they do not serve it, Conflict naming what each serves when
        they serve different models."""
        self._open()
        return asyncio.run_coroutine_threadsafe(self._fleet.ready(), self._loop).result()

    @property
    def sources(self) -> dict[str, str]:
        """Each model's source, by name."""
        return {name: served.source for name, served in self.served().items()}

    @property
    def identities(self) -> dict[str, str]:
        from pickscore.client.fleet import by_name

        return by_name(self.served())

    @property
    def model(self) -> str:
        return ",".join(f"{name}={source}" for name, source in self.sources.items())

    @property
    def name(self) -> str:
        return f"{self.model} on {','.join(self.servers)}"

    def scorer_names(self) -> list[str]:
        """Each model as ``evaluate-models`` names its scorer: its source on the servers."""
        return [f"{self.sources[name]} on {','.join(self.servers)}" for name in self.names]

    # The ways in -------------------------------------------------------------------------------------------

    def score_all(
        self, prompt: str, images: Sequence[Any], skip_invalid: bool = False, progress: bool = False
    ) -> tuple[np.ndarray, dict[int, PickScoreError]]:
        """One prompt, many images -> (scores (N, models), NaN where failed; errors by position, each naming its
        image by its place in ``images``). Without ``skip_invalid`` the first bad image raises."""
        if not images:
            raise InvalidInput("no images given")
        errors: dict[int, PickScoreError] = {}
        todo, data = [], []
        for i, image in enumerate(images):
            try:
                data.append(_read(image))
                todo.append(i)
            except InvalidInput as e:
                errors[i] = InvalidInput(f"{describe_item(i, image)}: {e}")
        scores, failed = self._collect(self._submit_all([prompt] * len(todo), data), len(images), todo)
        for i, e in failed.items():  # the server's answer, its image named by its place in ``images``
            errors[i] = InvalidInput(item_renamed(e, describe_item(i, images[i])))
        if errors and not skip_invalid:
            raise errors[min(errors)]
        return scores, dict(sorted(errors.items()))

    def prepare(self, rows: list[Row]) -> tuple[dict[int, str], list[int], list[Future]]:
        """Send the shard's rows, each with its prompt (sent while the shard before it is collected); an image file
        is read here, as ``OnServers`` reads it, so one that cannot be read fails its row alike."""
        errors = {i: r.error for i, r in enumerate(rows) if r.error}
        todo, data = [], []
        for i in (i for i in range(len(rows)) if i not in errors):
            try:
                data.append(_read(rows[i].image if rows[i].image is not None else rows[i].path))
                todo.append(i)
            except InvalidInput as e:
                errors[i] = str(e)
        return errors, todo, self._submit_all([rows[i].prompt for i in todo], data)

    def complete(self, rows: list[Row], prepared) -> tuple[np.ndarray, dict[int, str], dict[str, np.ndarray]]:
        """-> (scores (N, models), NaN where failed; reasons by row; no extra columns)."""
        errors, todo, futures = prepared
        scores, failed = self._collect(futures, len(rows), todo)
        errors.update({i: item_reason(e) for i, e in failed.items()})
        return scores, errors, {}

    def close(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._fleet.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = None

    # On the background loop ---------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._loop is not None:
            return
        from pickscore.client.fleet import Fleet

        def sender(address: str, tls_server_name: str | None):
            http = address.startswith(("http://", "https://"))
            return (_HttpSender if http else _GrpcSender)(address, self.connection, self.names, tls_server_name)

        expect = self.expect_model.split(",") if self.expect_model else []
        self._fleet = Fleet(self.servers, sender, self.names, self.connection, expect=expect, per_replica=INFLIGHT)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pickscore-models", daemon=True)
        self._thread.start()

    def _submit_all(self, prompts: list[str], images: list[bytes]) -> list[Future]:
        """Requests of up to CHUNK pairs -> a Future of each request's Answer."""
        self._open()
        futures = []
        for start in range(0, len(images), CHUNK):
            part = slice(start, start + CHUNK)
            futures.append(asyncio.run_coroutine_threadsafe(self._request(prompts[part], images[part]), self._loop))
        return futures

    def _collect(self, futures: list[Future], n: int, todo: list[int]) -> Answer:
        """The requests' answers into (n, models) scores at the rows ``todo``, errors by row."""
        scores = np.full((n, len(self.names)), np.nan, np.float32)
        errors: dict[int, PickScoreError] = {}
        done = 0
        for future in futures:
            values, failed = future.result()  # anything but a bad image (an outage) raises here
            rows = todo[done : done + len(values)]
            scores[rows] = values
            errors.update({rows[j]: e for j, e in failed.items()})
            done += len(values)
        return scores, errors

    async def _request(self, prompts: list[str], images: list[bytes], deadline: float | None = None) -> Answer:
        """One request, to the best server; refused for a bad image, one request per image, so only that one
        fails."""
        deadline = deadline or asyncio.get_running_loop().time() + self.timeout

        async def send(sender, timeout: float) -> np.ndarray:
            return await sender.scores(prompts, images, timeout)

        try:
            return await self._fleet.call(len(images), send, deadline), {}
        except InvalidInput as e:
            if len(images) == 1:
                return np.full((1, len(self.names)), np.nan, np.float32), {0: e}
        parts = await asyncio.gather(*(self._request([p], [i], deadline) for p, i in zip(prompts, images)))
        errors = {j: failed[0] for j, (_, failed) in enumerate(parts) if failed}
        return np.concatenate([values for values, _ in parts]), errors


def _read(image: Any) -> bytes:
    from pickscore.model.preprocess import read_image_bytes

    data = read_image_bytes(image)
    if not isinstance(data, bytes):
        raise InvalidInput("an image must be encoded bytes or a path here")
    return data


class _GrpcSender:
    """scoring.v1 Rewards requests (``AsyncClient.rewards``): each pair scored by every model, raw scores read."""

    def __init__(self, address: str, connection: dict[str, Any], names: list[str], tls_server_name: str | None = None):
        from pickscore.client import AsyncClient

        self.client = AsyncClient(address, **{**connection, "tls_server_name": tls_server_name})
        self.weights = [(name, 1.0) for name in names]

    async def scores(self, prompts: list[str], images: list[bytes], timeout: float) -> np.ndarray:
        answer = await self.client.rewards("", images, self.weights, "none", prompts=prompts, timeout=timeout)
        return np.stack([part.scores for part in answer.models.values()], axis=1)  # in the order asked

    async def close(self) -> None:
        await self.client.close()


class _HttpSender:
    """POST /v1/rewards in msgpack (images raw, never base64), as RewardClient's HTTP sender; raw scores read."""

    def __init__(self, address: str, connection: dict[str, Any], names: list[str], tls_server_name: str | None = None):
        from pickscore.tls import ssl_context

        self.url = address.rstrip("/") + "/v1/rewards"
        self.fields = {"models": [{"model": name, "weight": 1.0} for name in names], "normalize": "none"}
        self.headers = {"Content-Type": "application/msgpack"}
        if connection.get("token"):
            self.headers["authorization"] = f"Bearer {connection['token']}"
        self.ssl = ssl_context(connection.get("tls_ca"), connection.get("tls_cert"), connection.get("tls_key"))
        self.server_name = tls_server_name
        self.session = None

    async def scores(self, prompts: list[str], images: list[bytes], timeout: float) -> np.ndarray:
        import aiohttp

        from pickscore.client.http import post_msgpack

        if self.session is None:
            self.session = aiohttp.ClientSession()
        fields = {"prompts": prompts, "images": [{"data": i} for i in images], **self.fields}
        payload = await post_msgpack(self.session, self.url, fields, self.headers, self.ssl, timeout, self.server_name)
        return np.array([m["scores"] for m in payload["models"]], np.float32).T

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
