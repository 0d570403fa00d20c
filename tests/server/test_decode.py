"""Decoding in worker processes: the same crops as threads, bad images named, a request's images grouped into
jobs (spread over idle workers, few and large when they are busy), and a dead worker costs only the calls it held;
through a server, and the pool on its own."""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from pickscore.backends.torch_backend import TorchBackend
from pickscore.client import Client
from pickscore.errors import Internal, InvalidInput, Unavailable
from pickscore.model.checkpoint import resolve
from pickscore.model.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig, load_uint8
from pickscore.scorer import Scorer
from pickscore.server.app import ServerThread
from pickscore.server.decode import CHUNK, DEPTH, INPUT_BYTES, DecodePool
from pickscore.server.engine import Engine, ImageItem, Shared
from pickscore.server.metrics import Metrics
from tests.conftest import varied_images
from tests.server.conftest import PROMPT, settings_for

IMAGES = [data for _, data, _ in varied_images()[:8]]


@pytest.fixture(scope="module")
def server(tiny_hf_dir):
    # admission by count alone: many requests at once put 48 images in flight, past the default bound of one batch
    settings = settings_for(tiny_hf_dir, decode_processes=True, decode_workers=2, max_queue_wait_s="0")
    with ServerThread(settings) as s:
        yield s


def big_jpeg(side: int = 5000) -> bytes:
    """A JPEG that takes a worker a good fraction of a second to decode: time to kill it mid-image."""
    noise = np.random.default_rng(0).integers(0, 256, (side // 10, side // 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).resize((side, side), Image.Resampling.NEAREST).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` every few milliseconds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for: {what}"
        time.sleep(0.002)


def test_processes_score_as_the_in_process_scorer(server, tiny_hf_dir):
    expected = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32").score(PROMPT, IMAGES)
    with Client(server.address) as client:
        np.testing.assert_allclose(client.score(PROMPT, IMAGES), expected, atol=1e-5)


def test_a_bad_image_is_named_from_the_worker(server):
    with Client(server.address) as client, pytest.raises(InvalidInput, match=r"image 1: not a decodable image"):
        client.score(PROMPT, [IMAGES[0], b"not an image at all"])


def test_a_killed_worker_fails_only_what_it_held_and_is_replaced(server):
    decoder = server.server.engine.decoder
    before = decoder.replaced
    outcomes: list[object] = []

    def call(images: list[bytes]) -> None:
        with Client(server.address) as client:
            try:
                outcomes.append(client.score(PROMPT, images))
            except Exception as e:  # what the caller sees, kept for the assertions below
                outcomes.append(e)

    slow = threading.Thread(target=call, args=([big_jpeg()],))
    slow.start()
    workers = decoder.processes_alive()
    wait_until(lambda: decoder.in_hand, "the big image reached a worker")  # it takes it a fraction of a second
    for process in workers:
        process.kill()
    slow.join(60)
    call(IMAGES[:2])  # a request right after the death: fails cleanly or lands on the new pool
    failures = [o for o in outcomes if isinstance(o, Exception)]
    assert failures, "killing every worker mid-image must fail that image's request"
    assert all(isinstance(e, Internal) and "decode worker" in str(e) for e in failures), failures
    assert decoder.replaced == before + len(workers)
    # The server goes on: the replacement workers decode as before.
    call(IMAGES)
    assert isinstance(outcomes[-1], list) and len(outcomes[-1]) == len(IMAGES)
    assert server.server.state.ready and not server.server.state.draining


def test_decoding_on_the_device_scores_jpegs_closely_and_the_rest_exactly(tiny_hf_dir):
    """--decode-on-device through a real server (the device is the CPU here; the same code runs nvJPEG on a GPU):
    every fixture image scores within a hair of the exact path, non-JPEGs exactly, and the best image stays best."""
    every = [data for _, data, _ in varied_images()]
    jpegs = [i for i, data in enumerate(every) if data[:3] == b"\xff\xd8\xff"]
    expected = np.asarray(Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32").score(PROMPT, every))
    with ServerThread(settings_for(tiny_hf_dir, decode_on_device=True)) as server, Client(server.address) as client:
        got = np.asarray(client.score(PROMPT, every))
    others = [i for i in range(len(every)) if i not in jpegs]
    assert len(jpegs) >= 8 and others
    np.testing.assert_allclose(got[others], expected[others], atol=1e-5)
    np.testing.assert_allclose(got[jpegs], expected[jpegs], atol=0.05)
    assert np.abs(got[jpegs] - expected[jpegs]).max() > 0  # they did take the approximate path
    assert int(np.argmax(got)) == int(np.argmax(expected))


def test_decoding_on_the_device_is_refused_with_processes_or_another_backend(tiny_hf_dir):
    settings = settings_for(tiny_hf_dir, decode_on_device=True)
    with pytest.raises(ValueError, match="drop --decode-processes"):
        replace(settings, decode_processes=True).validate()
    backend = TorchBackend(resolve(tiny_hf_dir))
    backend.name = "onnxruntime"  # as an ONNX export would load
    with pytest.raises(ValueError, match="needs the torch backend; this model runs on onnxruntime"):
        Engine(backend, settings, Metrics().for_model("m"), Shared(settings))


def test_processes_take_pixels_and_odd_sizes_as_threads_do(server, tiny_hf_dir):
    """Raw pixels travel to a worker as one frame (no pickling) and crops come back through shared memory: the
    scores equal the in-process scorer's for pixels of several shapes, gray and RGBA included."""
    rng = np.random.default_rng(1)
    pixels = [
        rng.integers(0, 256, (300, 500, 3), dtype=np.uint8),
        rng.integers(0, 256, (224, 224), dtype=np.uint8),
        rng.integers(0, 256, (97, 640, 4), dtype=np.uint8),
    ]
    expected = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32").score(PROMPT, pixels)
    with Client(server.address) as client:
        np.testing.assert_allclose(client.score(PROMPT, pixels), expected, atol=1e-5)
        with pytest.raises(InvalidInput, match=r"image 1: .*aspect ratio"):
            client.score(PROMPT, [pixels[0], np.zeros((2, 400, 3), np.uint8)])


def test_many_requests_at_once_through_few_workers(server):
    """More images in flight than the workers hold (2 each): the rest wait their turn and all come back right."""
    with Client(server.address) as client:
        alone = [client.score(PROMPT, [image]) for image in IMAGES]
    results: dict[int, list[float]] = {}

    def call(i: int) -> None:
        with Client(server.address) as client:
            results[i] = client.score(PROMPT, IMAGES)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 6
    for scores in results.values():
        np.testing.assert_allclose(scores, [a[0] for a in alone], atol=1e-6)


def pool_of(processes: bool, preprocess: PreprocessConfig | None = None, workers: int = 1) -> DecodePool:
    return DecodePool(preprocess or PreprocessConfig(), DEFAULT_MAX_PIXELS, 50.0, workers, processes)


def odd_pixels() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(300, 500, 3), (224, 224), (97, 640, 4)]]


def held_sizes(pool: DecodePool) -> list[int]:
    """The image counts of the jobs the worker processes hold now, smallest first."""
    return sorted(len(job.images) for worker in pool._live for job, _ in worker.jobs.values())


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
@pytest.mark.parametrize("crop", [True, False], ids=["centre-crop", "any-size"])
def test_the_pool_crops_as_load_uint8_and_says_what_is_wrong(processes, crop):
    """Encoded images and raw pixels with bad ones among them, several calls at once, more jobs than the workers
    hold: every crop equals load_uint8's, in order, through the shared slab (a centre crop) or the reply (crops of
    any size); a bad image is its InvalidInput, with the reason load_uint8 gives and no image number (the caller
    names the item), in its place among the good ones; and the pool goes on."""
    preprocess = PreprocessConfig(do_center_crop=crop)
    bad = {3: b"not an image at all", 9: np.zeros((2, 400, 3), np.uint8), 12: b""}
    inputs = [*IMAGES, *odd_pixels()]
    for i, data in sorted(bad.items()):
        inputs.insert(i, data)
    reasons = {3: "^not a decodable image", 9: "^image is 400x2, an aspect ratio of 200:1", 12: "^empty file$"}
    expected = [None if i in bad else load_uint8(x, preprocess, max_aspect_ratio=50.0) for i, x in enumerate(inputs)]

    async def main() -> None:
        pool = pool_of(processes, preprocess, workers=2)
        await pool.start()
        try:
            calls = [inputs, inputs[::-1], inputs[5:], inputs]  # 4 calls of 9 to 14 images: 8 jobs, 4 in hand
            for order, got in zip(calls, await asyncio.gather(*(pool.crops(c) for c in calls))):
                assert len(got) == len(order)
                for x, crop_ in zip(order, got):
                    i = next(i for i, y in enumerate(inputs) if y is x)
                    if i in bad:
                        assert isinstance(crop_, InvalidInput) and re.search(reasons[i], str(crop_)), crop_
                    else:
                        assert crop_.dtype == np.uint8
                        np.testing.assert_array_equal(crop_, expected[i])
            assert pool.jobs == 8
            np.testing.assert_array_equal((await pool.crops(IMAGES[:1]))[0], expected[0])
        finally:
            pool.close()

    asyncio.run(main())


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_a_request_on_busy_workers_is_one_job(processes):
    """Every worker busy: a request's 8 images go as one job (one frame, one reply) and come back as load_uint8
    crops them, in order."""
    slow = big_jpeg()
    expected = [load_uint8(x, PreprocessConfig()) for x in IMAGES]

    async def main() -> None:
        pool = pool_of(processes, workers=2)
        await pool.start()
        try:
            held = [asyncio.ensure_future(pool.crops([slow])) for _ in range(2)]  # one on each idle worker
            await asyncio.sleep(0)
            assert pool.jobs == 2
            if processes:
                assert held_sizes(pool) == [1, 1]
            got = await pool.crops(IMAGES)
            assert pool.jobs == 3
            assert len(got) == len(IMAGES)
            for want, crop_ in zip(expected, got):
                np.testing.assert_array_equal(crop_, want)
            assert all(len(r) == 1 and r[0].shape == (224, 224, 3) for r in await asyncio.gather(*held))
        finally:
            pool.close()

    asyncio.run(main())


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
@pytest.mark.parametrize(("n", "sizes"), [(1, [1]), (8, [4, 4]), (20, [6, 7, 7])])
def test_a_request_on_idle_workers_spreads_over_them_in_jobs_of_at_most_chunk(processes, n, sizes):
    """Two idle workers: a request goes as one job per idle worker (8 images as 2 jobs of 4), but no job over
    CHUNK images (20 as 3 jobs) and no empty job (1 image as 1); the crops come back in order."""
    inputs = [*IMAGES, *odd_pixels(), *IMAGES, *IMAGES][:n]
    expected = [load_uint8(x, PreprocessConfig()) for x in inputs]

    async def main() -> None:
        pool = pool_of(processes, workers=2)
        await pool.start()
        try:
            call = asyncio.ensure_future(pool.crops(inputs))
            await asyncio.sleep(0)  # the call has sent its jobs; no reply is read before we look
            assert pool.jobs == len(sizes)
            if processes:
                assert held_sizes(pool) == sizes
            got = await call
            for want, crop_ in zip(expected, got, strict=True):
                np.testing.assert_array_equal(crop_, want)
        finally:
            pool.close()

    assert max(sizes) <= CHUNK
    asyncio.run(main())


def test_a_jobs_images_travel_in_shared_memory_where_they_fit_and_on_the_socket_where_not():
    """Jobs through one worker, one after another: small JPEGs (one copy into the job's region of the shared
    inputs), pixels over INPUT_BYTES (on the socket), small ones again over what the region held before: every
    crop is load_uint8's, whichever way its bytes went."""
    large = [np.random.default_rng(i).integers(0, 256, (1536, 1536, 3), np.uint8) for i in range(2)]  # 13.5 MiB
    assert sum(x.nbytes for x in large) > INPUT_BYTES >= sum(len(x) for x in IMAGES)
    calls = [IMAGES, large, IMAGES[::-1], IMAGES[2:5], large[:1] + IMAGES[:1], large[:1]]

    async def main() -> None:
        pool = pool_of(True, workers=1)
        await pool.start()
        try:
            for inputs in calls:
                got = await pool.crops(inputs)
                for x, crop_ in zip(inputs, got, strict=True):
                    np.testing.assert_array_equal(crop_, load_uint8(x, PreprocessConfig()))
        finally:
            pool.close()

    asyncio.run(main())


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_a_closed_pool_refuses_at_once(processes):
    async def main() -> None:
        pool = pool_of(processes)
        await pool.start()
        pool.close()
        with pytest.raises(Unavailable, match="decode pool is closed"):
            await asyncio.wait_for(pool.crops(IMAGES[:1]), 30)  # it used to wait for a worker forever

    asyncio.run(main())


def test_closing_the_pool_cancels_what_it_holds_and_ends_its_workers():
    async def main() -> None:
        pool = pool_of(True)
        await pool.start()
        (process,) = pool.processes_alive()
        calls = [asyncio.ensure_future(pool.crops([image])) for image in IMAGES[: DEPTH + 2]]  # 2 in hand, 2 waiting
        await asyncio.sleep(0)
        assert pool.in_hand == DEPTH
        pool.close()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        assert pool.processes_alive() == [] and pool.replaced == 0  # closing is not a death to recover from
        process.join(10)
        assert process.exitcode is not None

    asyncio.run(main())


def test_a_call_given_up_drops_its_waiting_jobs_and_ignores_the_replies_of_those_in_hand():
    async def main() -> None:
        pool = pool_of(True)
        await pool.start()
        try:
            slow = big_jpeg()
            first = asyncio.ensure_future(pool.crops([slow]))
            in_hand = asyncio.ensure_future(pool.crops([slow, IMAGES[0]]))
            waiting = asyncio.ensure_future(pool.crops(IMAGES))
            await asyncio.sleep(0)
            assert pool.in_hand == 3 and pool.jobs == 2
            in_hand.cancel()
            waiting.cancel()
            assert len(await first) == 1
            np.testing.assert_array_equal((await pool.crops(IMAGES[1:2]))[0], load_uint8(IMAGES[1], PreprocessConfig()))
            assert pool.jobs == 3  # the waiting call's job was never sent
            assert pool.in_hand == 0 and pool.replaced == 0
        finally:
            pool.close()
        assert in_hand.cancelled() and waiting.cancelled()

    asyncio.run(main())


def test_a_killed_worker_fails_the_call_it_held_with_internal_and_the_pool_decodes_on():
    async def main() -> None:
        pool = pool_of(True)
        await pool.start()
        try:
            (process,) = pool.processes_alive()
            held = asyncio.ensure_future(pool.crops([big_jpeg(), *IMAGES[:3]]))  # one job of 4
            while not pool.in_hand:  # sent to the worker, which takes a fraction of a second to decode it
                await asyncio.sleep(0.002)
            assert pool.in_hand == 4 and pool.jobs == 1
            process.kill()
            with pytest.raises(Internal, match="a decode worker process died while preprocessing this image"):
                await asyncio.wait_for(held, 60)
            got = await pool.crops(IMAGES)
            for image, crop_ in zip(IMAGES, got, strict=True):
                np.testing.assert_array_equal(crop_, load_uint8(image, PreprocessConfig()))
            assert pool.replaced == 1 and pool.processes_alive() != [process]
        finally:
            pool.close()

    asyncio.run(main())


def test_the_engine_names_the_image_a_decode_error_is_about(tiny_hf_dir):
    """The pool says what is wrong; the engine says which image: its index, and the caller's id when it gave one."""

    async def main() -> None:
        settings = settings_for(tiny_hf_dir, warmup=False)
        shared = Shared(settings)
        engine = Engine(TorchBackend(resolve(tiny_hf_dir)), settings, Metrics().for_model("m"), shared)
        await engine.start()
        try:
            good, bad = ImageItem(IMAGES[0]), ImageItem(b"not an image at all", id="upload-7")
            with pytest.raises(InvalidInput, match=r"^image 1 \(id 'upload-7'\): not a decodable image"):
                await engine.score([PROMPT], [good, bad], deadline=None)
            with pytest.raises(InvalidInput, match=r"^image 0: not a decodable image"):
                await engine.score([PROMPT], [ImageItem(b"not an image at all")], deadline=None)
            assert len(await engine.score([PROMPT], [good], deadline=None)) == 1
        finally:
            await engine.stop()
            shared.close(hung=False)

    asyncio.run(main())
