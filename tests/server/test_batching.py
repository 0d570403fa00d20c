"""How batches form and where forward passes run: a request's items enter a tower's queue as one block, split only
where a batch has no room for all of them; against a real server on loopback (tiny model), requests share one
forward pass even while some of their images still decode, and on a CPU the two towers take turns on one thread
instead of oversubscribing the cores."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pickscore.backends.torch_backend import TorchBackend
from pickscore.client import Client
from pickscore.model.checkpoint import resolve
from pickscore.server.app import ServerThread
from pickscore.server.batcher import Batcher
from pickscore.server.metrics import Metrics
from tests.server.conftest import PROMPT, jpeg, metric, settings_for


def slow_png(seed: int, side: int = 1200) -> bytes:
    """Noise that compresses badly: tens of milliseconds to decode and resize, as a large generated image."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def batches(server: ServerThread) -> tuple[float, float]:
    """(forward passes, images) the image tower has run so far."""
    return (
        metric(server, "pickscore_batch_size_count", tower="image"),
        metric(server, "pickscore_batch_size_sum", tower="image"),
    )


@pytest.mark.parametrize("gather_ms, one_pass", [(2000.0, True), (0.0, False)])
def test_requests_share_one_forward_pass_while_the_later_ones_still_decode(tiny_hf_dir, gather_ms, one_pass):
    """Two requests of three slow images each arrive at once; one decode thread decodes the first request's images,
    then the second's, tens of milliseconds apart, far past the 1 ms queue delay: the batch waits for the images
    still decoding (--max-gather-ms) and runs all six in one pass. Without that wait (0) the first request goes
    alone. (A request's own images always reach the tower together, as one block.)"""
    images = [slow_png(i) for i in range(6)]
    settings = settings_for(tiny_hf_dir, decode_workers=1, max_queue_delay_ms=1.0, max_gather_ms=gather_ms)
    with ServerThread(settings) as server, Client(server.address) as client:
        before_passes, before_images = batches(server)
        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(client.score, PROMPT, images[i : i + 3]) for i in (0, 3)]
            assert [len(c.result()) for c in calls] == [3, 3]
        passes, items = batches(server)
    assert items - before_images == 6
    if one_pass:
        assert passes - before_passes == 1
    else:
        assert passes - before_passes == 2


class TurnTakingBackend(TorchBackend):
    """The real tiny torch backend that records how many forward passes run at once, in all and per tower."""

    def __init__(self, ref: str, accelerated: bool, pipeline_depth: int):
        super().__init__(resolve(ref))
        self.accelerated = accelerated  # what the engine sizes its tower threads from
        self.pipeline_depth = pipeline_depth
        self._lock = threading.Lock()
        self.running = {"image": 0, "text": 0}
        self.most = {"image": 0, "text": 0, "both": 0}

    def _pass(self, tower: str, fn, x):
        with self._lock:
            self.running[tower] += 1
            self.most[tower] = max(self.most[tower], self.running[tower])
            self.most["both"] = max(self.most["both"], sum(self.running.values()))
        try:
            time.sleep(0.05)  # long enough for more work to arrive meanwhile
            return fn(x)
        finally:
            with self._lock:
                self.running[tower] -= 1

    def encode_image(self, pixels):
        return self._pass("image", super().encode_image, pixels)

    def encode_text(self, tokens):
        return self._pass("text", super().encode_text, tokens)


@pytest.mark.parametrize(
    "accelerated, depth, most_both, most_image",
    [
        (False, 2, 1, 1),  # a CPU: one pass at a time in all, whatever the backend could pipeline
        (True, 1, 2, 1),  # a GPU: each tower has its own thread
        (True, 2, 4, 2),  # and two batches in flight per tower where the backend overlaps copy and compute
    ],
)
def test_forward_passes_at_once_cpu_one_gpu_per_tower_and_pipelined(
    tiny_hf_dir, accelerated, depth, most_both, most_image
):
    """Many distinct prompts and images at once keep both towers busy. On a CPU (each pass already uses every
    core) no two forward passes overlap; on a GPU each tower has its own launching threads, one per batch the
    backend keeps in flight."""
    backend = TurnTakingBackend(str(tiny_hf_dir), accelerated, depth)
    # admission by count alone: 16 callers queue far past auto's one batch of 2
    settings = settings_for(
        tiny_hf_dir, max_batch_size=2, text_max_batch_size=1, text_cache_bytes=0, max_queue_wait_s="0"
    )
    with ServerThread(settings, backend=backend) as server, Client(server.address) as client:
        backend.most = dict.fromkeys(backend.most, 0)  # after warm-up
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: client.score(f"{PROMPT} {i}", [jpeg(i), jpeg(i + 50)]), range(16)))
    assert all(len(r) == 2 for r in results)
    assert backend.most["image"] == most_image and backend.most["text"] == most_image
    assert backend.most["both"] == most_both


class Recorder:
    """A tower that doubles its rows and records each batch's size; ``gate`` holds every pass until set."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.gate.wait(30)
        self.sizes.append(len(x))
        return x * 2


def run_blocks(blocks: list[np.ndarray], max_batch_size: int, cancel: int | None = None):
    """Submit ``blocks`` to a batcher over a held tower (so they queue), cancel block ``cancel``'s caller, release
    the tower -> (the recorder, each block's answer or exception, the metrics)."""

    async def main():
        metrics = Metrics()
        tower = Recorder()
        batcher = Batcher("image", tower, max_batch_size, 0.0, 1024, metrics.for_model("m"), max_wait_s=0.0)
        await batcher.start()
        tower.gate.clear()
        with batcher.admit(1):
            held = asyncio.ensure_future(batcher.submit(np.zeros((1, 2), np.float32)))  # the pass holding the tower
            while not batcher._computing:
                await asyncio.sleep(0.001)
        calls = [asyncio.ensure_future(batcher.submit(b)) for b in blocks]
        await asyncio.sleep(0.01)  # every block queued behind the held pass
        if cancel is not None:
            calls[cancel].cancel()
        tower.gate.set()
        await held
        answers = await asyncio.gather(*calls, return_exceptions=True)
        await batcher.stop()
        return tower, answers, metrics

    return asyncio.run(main())


def rows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + 2 * n, dtype=np.float32).reshape(n, 2)


def test_a_requests_block_is_split_only_where_a_batch_has_no_room_for_it():
    tower, answers, _ = run_blocks([rows(3), rows(3, 100), rows(10, 200)], max_batch_size=4)
    # 3 + 1 of the second block; its other 2 + 2 of the third; then 4 and 4 of the third
    assert tower.sizes == [1, 4, 4, 4, 4]
    for block, answer in zip([rows(3), rows(3, 100), rows(10, 200)], answers):
        np.testing.assert_array_equal(answer, block * 2)  # every row back, in order, whatever the passes


def test_blocks_that_fit_go_whole_and_in_arrival_order():
    tower, answers, _ = run_blocks([rows(2), rows(2, 10), rows(4, 20)], max_batch_size=4)
    assert tower.sizes == [1, 4, 4]
    np.testing.assert_array_equal(answers[2], rows(4, 20) * 2)


def test_a_caller_that_left_costs_none_of_its_rows():
    tower, answers, metrics = run_blocks([rows(3), rows(6, 100), rows(2, 200)], max_batch_size=4, cancel=1)
    assert tower.sizes == [1, 3, 2]  # the cancelled block's six rows never reach the tower
    assert isinstance(answers[1], asyncio.CancelledError)
    dropped = metrics.registry.get_sample_value(
        "pickscore_dropped_items_total", {"model": "m", "tower": "image", "reason": "cancelled"}
    )
    assert dropped == 6
