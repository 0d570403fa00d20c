"""The project's own API, pickscore.v1.ScoringService (proto/pickscore/v1/scoring.proto), over ``api.Scoring``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict

from pickscore.errors import PickScoreError
from pickscore.server.api import RawPixels, Scoring, image_item
from pickscore.server.boundary import ServerState, boundary, deadline_of
from pickscore.server.engine import ImageItem
from pickscore.server.streams import windowed
from pickscore.status import retry_after_ms, status_of
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ScoringService"].full_name
# the enum's numbers, as the api names them
NORMALIZE = {pb.NORMALIZE_NONE: "none", pb.NORMALIZE_DECLARED: "declared", pb.NORMALIZE_RUNNING: "running"}


class ScoringService(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, scoring: Scoring, state: ServerState):
        self.scoring = scoring
        self.state = state

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        async with boundary(self.state, "Score", context):
            return await self._score(request, deadline_of(context))

    async def Rank(self, request: pb.RankRequest, context) -> pb.RankResponse:
        async with boundary(self.state, "Rank", context):
            items = _items(request.images)
            ranking = await self.scoring.rank(request.prompt, items, request.top_k, deadline_of(context), request.model)
            return pb.RankResponse(
                ranking=[
                    pb.RankedImage(index=r.index, id=r.id, score=r.score, probability=r.probability) for r in ranking
                ]
            )

    async def ScoreStream(
        self, requests: AsyncIterator[pb.ScoreStreamRequest], context
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        async def one(message: pb.ScoreStreamRequest) -> pb.ScoreStreamResponse:
            try:
                return pb.ScoreStreamResponse(
                    tag=message.tag, response=await self._score(message.request, deadline_of(context))
                )
            except PickScoreError as e:  # in-band: this request failed, the stream goes on
                code, text = status_of(e)
                # an Overloaded's hint, as a unary refusal's trailer carries it; 0: none
                error = pb.Error(code=code.value[0], message=text, retry_after_ms=retry_after_ms(e) or 0)
                return pb.ScoreStreamResponse(tag=message.tag, error=error)

        async with boundary(self.state, "ScoreStream", context):
            async for response in windowed(requests, one, self.scoring.settings.stream_window):
                yield response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        async with boundary(self.state, "GetModelInfo", context, admit=False):
            return pb.GetModelInfoResponse(**asdict(self.scoring.model_info(request.model)))

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        async with boundary(self.state, "ListModels", context, admit=False):
            return pb.ListModelsResponse(models=[pb.GetModelInfoResponse(**asdict(m)) for m in self.scoring.models()])

    async def Rewards(self, request: pb.RewardsRequest, context) -> pb.RewardsResponse:
        async with boundary(self.state, "Rewards", context):
            rewards = await self.scoring.rewards(
                request.prompt,
                request.prompts,
                _items(request.images),
                [(m.model, m.weight) for m in request.models],
                NORMALIZE.get(request.normalize, str(request.normalize)),
                deadline_of(context),
            )
            return pb.RewardsResponse(
                rewards=rewards.rewards, models=[pb.ModelScores(**asdict(m)) for m in rewards.models]
            )

    async def _score(self, request: pb.ScoreRequest, deadline: float | None) -> pb.ScoreResponse:
        items = _items(request.images)
        results = await self.scoring.score(request.prompt, request.prompts, items, deadline, request.model)
        return pb.ScoreResponse(results=[pb.ScoredImage(index=r.index, id=r.id, score=r.score) for r in results])


def _items(images: Iterable[pb.Image]) -> list[ImageItem]:
    return [
        image_item(i, image.data, image.id, _pixels(image.pixels) if image.HasField("pixels") else None)
        for i, image in enumerate(images)
    ]


def _pixels(p: pb.Pixels) -> RawPixels:
    return RawPixels(p.height, p.width, p.channels, p.data)
