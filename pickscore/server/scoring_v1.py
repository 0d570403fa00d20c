"""The project's own API, pickscore.v1.ScoringService (proto/pickscore/v1/scoring.proto), over the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from pickscore.errors import InvalidInput, PickScoreError
from pickscore.server.boundary import ServerState, boundary
from pickscore.server.engine import Engine, ImageItem
from pickscore.server.streams import deadline_of, windowed
from pickscore.status import status_of
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc
from pickscore.version import __version__

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ScoringService"].full_name


class ScoringService(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, engine: Engine, state: ServerState):
        self.engine = engine
        self.state = state

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        async with boundary(self.state, "Score", context):
            return await self.score(request, deadline_of(context))

    async def Rank(self, request: pb.RankRequest, context) -> pb.RankResponse:
        async with boundary(self.state, "Rank", context):
            return await self.rank(request, deadline_of(context))

    async def ScoreStream(
        self, requests: AsyncIterator[pb.ScoreStreamRequest], context
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        async def one(message: pb.ScoreStreamRequest) -> pb.ScoreStreamResponse:
            try:
                return pb.ScoreStreamResponse(
                    tag=message.tag, response=await self.score(message.request, deadline_of(context))
                )
            except PickScoreError as e:  # in-band: this request failed, the stream goes on
                code, text = status_of(e)
                return pb.ScoreStreamResponse(tag=message.tag, error=pb.Error(code=code.value[0], message=text))

        async with boundary(self.state, "ScoreStream", context):
            async for response in windowed(requests, one, self.engine.settings.stream_window):
                yield response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        async with boundary(self.state, "GetModelInfo", context, admit=False):
            return self.model_info()

    # Transport-neutral: the gRPC methods above and the HTTP front door (/v1/...) call these.

    def model_info(self) -> pb.GetModelInfoResponse:
        backend, s = self.engine.backend, self.engine.settings
        return pb.GetModelInfoResponse(
            source=backend.source,
            backend=backend.name,
            device=backend.description,
            embed_dim=backend.embed_dim,
            logit_scale=backend.logit_scale,
            image_size=backend.preprocess.output_size[0],
            context_length=backend.tokenizer.context_length,
            max_batch_size=s.max_batch_size,
            max_images_per_request=s.max_images_per_request,
            max_image_bytes=s.max_image_bytes,
            version=__version__,
        )

    async def rank(self, request: pb.RankRequest, deadline: float | None) -> pb.RankResponse:
        items = _items(request.images)
        ranking = await self.engine.rank(request.prompt, items, request.top_k or None, deadline)
        return pb.RankResponse(
            ranking=[
                pb.RankedImage(index=i, id=items[i].id, score=ranking.scores[i], probability=ranking.probabilities[i])
                for i in ranking.order
            ]
        )

    async def score(self, request: pb.ScoreRequest, deadline: float | None) -> pb.ScoreResponse:
        if request.prompt and request.prompts:
            raise InvalidInput("set either prompt (one for all images) or prompts (one per image), not both")
        prompts = list(request.prompts) or [request.prompt]
        items = _items(request.images)
        scores = await self.engine.score(prompts, items, deadline)
        return pb.ScoreResponse(
            results=[
                pb.ScoredImage(index=i, id=item.id, score=float(s)) for i, (item, s) in enumerate(zip(items, scores))
            ]
        )


def _items(images) -> list[ImageItem]:
    return [
        ImageItem(image.data, image.id, _pixels(i, image) if image.HasField("pixels") else None)
        for i, image in enumerate(images)
    ]


def _pixels(index: int, image: pb.Image) -> np.ndarray:
    """An Image's raw pixels as (height, width, channels) uint8; InvalidInput naming the image when they do not fit."""
    p = image.pixels
    channels = p.channels or 3
    name = ImageItem(id=image.id).describe(index)
    if channels not in (1, 3, 4):
        raise InvalidInput(f"{name}: pixels have {channels} channels; 1 (gray), 3 (RGB) or 4 (RGBA)")
    if len(p.data) != p.height * p.width * channels:
        raise InvalidInput(
            f"{name}: {len(p.data)} bytes of pixels for {p.height}x{p.width}x{channels} "
            f"({p.height * p.width * channels} expected)"
        )
    pixels = np.frombuffer(p.data, np.uint8).reshape(p.height, p.width, channels)
    return pixels[..., 0] if channels == 1 else pixels
