"""A request whose deadline passed before its work started (what benchmarks/soak_bench.py's 2 ms calls do, many times
a second) fails with DEADLINE_EXCEEDED, and one whose caller leaves mid-flight is cancelled, and neither leaves
anything behind: no coroutine of its work dropped unawaited (each was a RuntimeWarning, a raw line on the server's
JSON log), no failure that nobody retrieves (asyncio's "exception was never retrieved"), and the engine serves the
next request."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings

import pytest

from pickscore.backends.torch_backend import TorchBackend
from pickscore.errors import DeadlineExceeded
from pickscore.model.checkpoint import resolve
from pickscore.server.engine import Engine, ImageItem, Shared
from pickscore.server.metrics import Metrics
from tests.server.conftest import PROMPT, jpeg, settings_for


def test_requests_past_their_deadline_or_left_by_their_caller_leave_nothing_behind(tiny_hf_dir, caplog):
    images = [ImageItem(jpeg(i)) for i in range(3)]

    async def main() -> list[int]:
        settings = settings_for(tiny_hf_dir, warmup=False)
        shared = Shared(settings)
        engine = Engine(TorchBackend(resolve(tiny_hf_dir)), settings, Metrics().for_model("m"), shared)
        await engine.start()
        try:
            for _ in range(3):
                deadline = asyncio.get_running_loop().time() - 0.001  # passed: the work is cancelled before it runs
                with pytest.raises(DeadlineExceeded, match="deadline passed"):
                    await engine.score([PROMPT], images, deadline)
            left = []
            for wait in (0.0, 0.001, 0.002, 0.004, 0.008):  # the caller leaves at several points of the work
                call = asyncio.ensure_future(engine.score([PROMPT], images, asyncio.get_running_loop().time() + 30))
                await asyncio.sleep(wait)
                call.cancel()
                left += await asyncio.gather(call, return_exceptions=True)  # a late cancel finds it answered
            assert sum(isinstance(x, asyncio.CancelledError) for x in left) >= 2, left
            return [len(await engine.score([PROMPT], images, deadline=None)) for _ in range(2)]
        finally:
            await engine.stop()
            shared.close(hung=False)

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.ERROR, logger="asyncio"):
        warnings.simplefilter("always")
        answered = asyncio.run(main())
        gc.collect()  # a dropped coroutine warns, and an unretrieved failure is logged, when it is collected
    assert answered == [3, 3]
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
