"""The asyncio client."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
import numpy as np

from pickscore.client.channel import Connection
from pickscore.client.wire import (
    ImageRef,
    Rewards,
    Weights,
    collect,
    domain_error,
    image_messages,
    model_weights,
    ranking,
    renumbered,
    rewards_of,
    rewards_requests,
    score_requests,
    stream_requests,
)
from pickscore.errors import InvalidInput, PickScoreError
from pickscore.model.scoring import Ranking, check_top_k
from pickscore.v1 import scoring_pb2 as pb


class AsyncClient(Connection):
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
        """As ``Client.model_info``: the model's name, version, kind, ``identity`` and limits (asked once)."""
        if self._info is None:
            self._info = await self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(model=self.model), None)
        return self._info

    async def list_models(self) -> list[pb.GetModelInfoResponse]:
        """Every model the server serves, the default first, each with its ``identity``."""
        return list((await self._call(self.stub.ListModels, pb.ListModelsRequest(), None)).models)

    async def _scores(self, requests: list[pb.ScoreRequest], timeout: float | None) -> list[float]:
        out: list[float] = []
        for request in requests:
            try:
                out += [r.score for r in (await self._call(self.stub.Score, request, timeout)).results]
            except InvalidInput as e:
                raise renumbered(e, len(out)) from None
        return out

    async def score(
        self, prompt: str, images: Sequence[ImageRef], ids: Sequence[str] | None = None, timeout: float | None = None
    ) -> list[float]:
        requests = score_requests(
            images, (await self.model_info()).max_images_per_request, prompt=prompt, ids=ids, model=self.model
        )
        return await self._scores(requests, timeout)

    async def score_pairs(
        self, prompts: Sequence[str], images: Sequence[ImageRef], timeout: float | None = None
    ) -> list[float]:
        requests = score_requests(
            images, (await self.model_info()).max_images_per_request, prompts=prompts, model=self.model
        )
        return await self._scores(requests, timeout)

    async def rank(
        self, prompt: str, images: Sequence[ImageRef], top_k: int | None = None, timeout: float | None = None
    ) -> Ranking:
        check_top_k(top_k)
        request = pb.RankRequest(prompt=prompt, images=image_messages(images, None), model=self.model)
        return ranking(await self._call(self.stub.Rank, request, timeout), len(images), top_k)

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
                stream_requests(prompt, refs, per_request, self.model), timeout=timeout, metadata=self.metadata
            ):
                collect(scores, errors, response, skip_invalid)
        except grpc.RpcError as e:
            raise domain_error(e) from None
        return scores, errors

    async def rewards(
        self,
        prompt: str,
        images: Sequence[ImageRef],
        models: Weights | None = None,
        normalize: str = "none",
        prompts: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> Rewards:
        weights = model_weights(models)
        per_request = (await self.model_info()).max_images_per_request
        requests = rewards_requests(images, per_request, weights, normalize, prompt=prompt, prompts=prompts)
        responses: list[pb.RewardsResponse] = []
        for request in requests:
            try:
                responses.append(await self._call(self.stub.Rewards, request, timeout))
            except InvalidInput as e:
                raise renumbered(e, len(responses) * per_request) from None
        return rewards_of(responses)
