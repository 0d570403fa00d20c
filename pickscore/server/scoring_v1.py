"""The project's own API, pickscore.v1.ScoringService (proto/pickscore/v1/scoring.proto), over the engine."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from pickscore import __version__
from pickscore.errors import InvalidInput, PickScoreError
from pickscore.server.engine import Engine, ImageItem
from pickscore.server.errors import ServerState, boundary, status_of
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ScoringService"].full_name


async def windowed(requests: AsyncIterator, handle: Callable[[Any], Awaitable[Any]], window: int) -> AsyncIterator:
    """Handle up to ``window`` stream messages at once; yield each answer as soon as it is ready."""
    out: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    done = object()

    async def one(message) -> None:
        try:
            await out.put(await handle(message))
        finally:
            slots.release()

    async def read() -> None:
        tasks: set[asyncio.Task] = set()
        try:
            async for message in requests:
                await slots.acquire()
                task = asyncio.create_task(one(message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await out.put(done)

    reader = asyncio.create_task(read())
    try:
        while (answer := await out.get()) is not done:
            yield answer
        await reader  # re-raise what ended the reading, if anything did
    finally:
        reader.cancel()


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as event-loop time, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


class ScoringService(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, engine: Engine, state: ServerState):
        self.engine = engine
        self.state = state

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        async with boundary(self.state, "Score", context):
            return await self._score(request, deadline_of(context))

    async def Rank(self, request: pb.RankRequest, context) -> pb.RankResponse:
        async with boundary(self.state, "Rank", context):
            items = _items(request.images)
            ranking = await self.engine.rank(request.prompt, items, request.top_k or None, deadline_of(context))
            return pb.RankResponse(ranking=[
                pb.RankedImage(index=i, id=items[i].id, score=ranking.scores[i], probability=ranking.probabilities[i])
                for i in ranking.order
            ])

    async def ScoreStream(self, requests: AsyncIterator[pb.ScoreStreamRequest], context) -> AsyncIterator[pb.ScoreStreamResponse]:
        async def one(message: pb.ScoreStreamRequest) -> pb.ScoreStreamResponse:
            try:
                return pb.ScoreStreamResponse(tag=message.tag, response=await self._score(message.request, deadline_of(context)))
            except PickScoreError as e:  # in-band: this request failed, the stream goes on
                code, text = status_of(e)
                return pb.ScoreStreamResponse(tag=message.tag, error=pb.Error(code=code.value[0], message=text))

        async with boundary(self.state, "ScoreStream", context):
            async for response in windowed(requests, one, self.engine.settings.stream_window):
                yield response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.GetModelInfoResponse:
        async with boundary(self.state, "GetModelInfo", context, admit=False):
            backend, s = self.engine.backend, self.engine.settings
            return pb.GetModelInfoResponse(
                source=backend.source, backend=backend.name, device=backend.description, embed_dim=backend.embed_dim,
                logit_scale=backend.logit_scale, image_size=backend.preprocess.output_size[0],
                context_length=backend.tokenizer.context_length, max_batch_size=s.max_batch_size,
                max_images_per_request=s.max_images_per_request, max_image_bytes=s.max_image_bytes, version=__version__)

    async def _score(self, request: pb.ScoreRequest, deadline: float | None) -> pb.ScoreResponse:
        if request.prompt and request.prompts:
            raise InvalidInput("set either prompt (one for all images) or prompts (one per image), not both")
        prompts = list(request.prompts) or [request.prompt]
        items = _items(request.images)
        scores = await self.engine.score(prompts, items, deadline)
        return pb.ScoreResponse(results=[pb.ScoredImage(index=i, id=item.id, score=float(s))
                                         for i, (item, s) in enumerate(zip(items, scores))])


def _items(images) -> list[ImageItem]:
    return [ImageItem(image.data, image.id) for image in images]
