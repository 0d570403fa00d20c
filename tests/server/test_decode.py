"""Decoding in worker processes: the same crops as threads, bad images named, and a dead worker costs only the
images it held; through a server, and the pool on its own."""

from __future__ import annotations

import asyncio
import io
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
from pickscore.server.decode import DEPTH, DecodePool
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


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
@pytest.mark.parametrize("crop", [True, False], ids=["centre-crop", "any-size"])
def test_the_pool_crops_as_load_uint8_and_says_what_is_wrong(processes, crop):
    """Encoded images and raw pixels, more at once than the worker holds: every crop equals load_uint8's, through
    the shared slab (a centre crop) or the socket (crops of any size); a bad image is InvalidInput with the reason
    load_uint8 gives, and the pool goes on."""
    preprocess = PreprocessConfig(do_center_crop=crop)
    inputs = [*IMAGES, *odd_pixels()]
    expected = [load_uint8(x, preprocess, max_aspect_ratio=50.0) for x in inputs]

    async def main() -> None:
        pool = pool_of(processes, preprocess)
        await pool.start()
        try:
            got = await asyncio.gather(*(pool.crop(x) for x in inputs))  # far more than DEPTH at once
            for want, crop_ in zip(expected, got):
                np.testing.assert_array_equal(crop_, want)
            with pytest.raises(InvalidInput, match="^not a decodable image"):
                await pool.crop(b"not an image at all")
            with pytest.raises(InvalidInput, match="aspect ratio"):
                await pool.crop(np.zeros((2, 400, 3), np.uint8))
            np.testing.assert_array_equal(await pool.crop(IMAGES[0]), expected[0])
        finally:
            pool.close()

    assert len(inputs) > DEPTH
    asyncio.run(main())


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_a_closed_pool_refuses_at_once(processes):
    async def main() -> None:
        pool = pool_of(processes)
        await pool.start()
        pool.close()
        with pytest.raises(Unavailable, match="decode pool is closed"):
            await asyncio.wait_for(pool.crop(IMAGES[0]), 30)  # it used to wait for a worker forever

    asyncio.run(main())


def test_closing_the_pool_cancels_what_it_holds_and_ends_its_workers():
    async def main() -> None:
        pool = pool_of(True)
        await pool.start()
        (process,) = pool.processes_alive()
        calls = [asyncio.ensure_future(pool.crop(image)) for image in IMAGES[: DEPTH + 2]]  # two in hand, two waiting
        await asyncio.sleep(0)
        pool.close()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
        assert pool.processes_alive() == [] and pool.replaced == 0  # closing is not a death to recover from
        process.join(10)
        assert process.exitcode is not None

    asyncio.run(main())


def test_a_killed_worker_fails_its_images_with_internal_and_the_pool_decodes_on():
    async def main() -> None:
        pool = pool_of(True)
        await pool.start()
        try:
            (process,) = pool.processes_alive()
            held = asyncio.ensure_future(pool.crop(big_jpeg()))
            while not pool.in_hand:  # sent to the worker, which takes a fraction of a second to decode it
                await asyncio.sleep(0.002)
            process.kill()
            with pytest.raises(Internal, match="a decode worker process died while preprocessing this image"):
                await held
            np.testing.assert_array_equal(await pool.crop(IMAGES[0]), load_uint8(IMAGES[0], PreprocessConfig()))
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
