"""Bidirectional streams computed in a bounded window (the gRPC transports' ScoreStream and ModelStreamInfer).

async for answer in windowed(requests, handle, window=8):   # at most 8 messages in flight, answers as ready
    yield answer
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any


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
