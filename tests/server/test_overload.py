"""Overload without collapse, against a real server on loopback whose image tower is deliberately slow or stuck:
admission by time (a bound in seconds, and the default, auto, from the measured batch time), all-or-nothing
requests, per-caller limits, priorities, and the hung-tower watchdog."""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from pickscore.backends.torch_backend import TorchBackend
from pickscore.client import AsyncClient, Client
from pickscore.errors import DeadlineExceeded, Internal, InvalidInput, Overloaded, Unavailable
from pickscore.model.checkpoint import resolve
from pickscore.model.preprocess import load_uint8
from pickscore.server.app import LIVENESS_SERVICE, ServerThread
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc
from tests.server.conftest import PROMPT, jpeg, metric, settings_for
from tests.server.test_decode import wait_until

RED, GREEN, MAGENTA = (255, 0, 0), (0, 255, 0), (255, 0, 255)
_POOL = ThreadPoolExecutor(4)  # blocking calls left running while a test goes on


def solid(rgb, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "PNG")
    return buf.getvalue()


class SlowBackend(TorchBackend):
    """The real tiny torch backend with a slow image tower (``per_item`` seconds an image, as a big model on a
    small machine), which records the colour of every image it computes. A batch holding a red image waits for
    ``release`` (a caller parked in the tower, so tests order events without timing them); one holding a
    magenta image never returns until the test ends (a hung kernel)."""

    def __init__(self, ref: str, per_item: float = 0.0):
        super().__init__(resolve(ref))
        self.per_item = per_item
        self.release = threading.Event()
        self.parked = threading.Event()  # set once a red image is in the tower
        self.computed: list[tuple[int, int, int]] = []
        self._marks = {rgb: load_uint8(solid(rgb), self.preprocess)[0, 0].tolist() for rgb in (RED, GREEN, MAGENTA)}

    def colours(self, pixels: np.ndarray) -> list:
        return [next((rgb for rgb, m in self._marks.items() if p[0, 0].tolist() == m), None) for p in pixels]

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        colours = self.colours(pixels)
        self.computed += colours
        if RED in colours:
            self.parked.set()
            self.release.wait(30)
        if MAGENTA in colours:
            self.release.wait(60)
        time.sleep(self.per_item * len(pixels))
        return super().encode_image(pixels)


@pytest.fixture
def slow(tiny_hf_dir):
    backend = SlowBackend(str(tiny_hf_dir))
    yield backend
    backend.release.set()  # let any thread still parked in the tower go


def _park(server: ServerThread, backend: SlowBackend, client: Client):
    """One request whose red image holds the image tower until ``backend.release`` is set."""
    call = _POOL.submit(client.score, PROMPT, [solid(RED)])
    assert backend.parked.wait(30)
    return call


def test_past_saturation_refusals_are_fast_with_a_hint_and_admitted_requests_meet_their_deadlines(tiny_hf_dir):
    """A tower computing 50 images/s, offered 8-image requests at about 5x what it can do, with 2 s deadlines and a
    0.5 s queue-wait budget: the excess is refused at once with RESOURCE_EXHAUSTED and a retry hint, and every
    admitted request finishes within its deadline (before this, they queued until their deadlines expired)."""
    backend = SlowBackend(str(tiny_hf_dir), per_item=0.02)
    settings = settings_for(tiny_hf_dir, max_batch_size=8, max_queue_wait_s="0.5")
    images = [jpeg(i) for i in range(8)]

    async def drive(address: str) -> list[tuple[object, float]]:
        async with AsyncClient(address, timeout=2.0) as client:
            await client.model_info()

            async def one() -> tuple[object, float]:
                start = time.perf_counter()
                try:
                    result = await client.score(PROMPT, images)
                except (Overloaded, DeadlineExceeded) as e:
                    result = e
                return result, time.perf_counter() - start

            calls = []
            for _ in range(60):  # 30 requests/s for 2 s: 240 images/s offered
                calls.append(asyncio.ensure_future(one()))
                await asyncio.sleep(1 / 30)
            return await asyncio.gather(*calls)

    with ServerThread(settings, backend=backend) as server:
        results = asyncio.run(drive(server.address))
        assert metric(server, "pickscore_admission_refusals_total", reason="queue_wait") > 0
    ok = [t for r, t in results if isinstance(r, list)]
    refused = [(r, t) for r, t in results if isinstance(r, Overloaded)]
    expired = [r for r, _ in results if isinstance(r, DeadlineExceeded)]
    assert not expired, expired[:3]
    assert len(ok) >= 10 and len(refused) >= 10, (len(ok), len(refused))
    assert all("image tower busy" in str(e) and "--max-queue-wait-s" in str(e) for e, _ in refused)
    assert all(e.retry_after_s and e.retry_after_s > 0 for e, _ in refused)  # the pushback trailer came through
    # at once: a refusal does not wait for the work ahead of it
    assert np.median([t for _, t in refused]) < np.median(ok) / 4


def auto_bound(refusal: Overloaded) -> tuple[float, float]:
    """(bound in seconds, measured ms per item) an auto refusal names; both as the message rounds them."""
    found = re.search(r"over (\S+) s \(auto: 1 x the measured batch time, \d+ items x (\S+) ms", str(refusal))
    assert found, str(refusal)
    return float(found[1]), float(found[2])


@pytest.mark.parametrize("warmup", [True, False], ids=["measured", "cold"])
def test_by_default_a_burst_is_refused_at_once_beyond_one_batch_of_work_ahead(tiny_hf_dir, slow, warmup):
    """Default settings (auto admission, batches of 32): twelve 4-image requests at once, behind a request holding
    the tower. Admitted requests queue only while the work ahead of them is at most one batch (32 images, the
    measured batch time): 8 are admitted (1 + 8 x 4 = 33 images), and the other 4 are refused with
    RESOURCE_EXHAUSTED while every admitted one still waits -- nothing has been computed yet. Cold (no warm-up,
    nothing measured), the same count holds, with no hint in seconds."""
    settings = settings_for(tiny_hf_dir, warmup=warmup)
    assert settings.queue_wait_limit() is None and settings.max_batch_size == 32  # the defaults

    async def burst(address: str) -> tuple[list, int, float]:
        async with AsyncClient(address, timeout=60) as client:
            requests = [[jpeg(4 * i + k) for k in range(4)] for i in range(12)]
            calls = [asyncio.ensure_future(client.score(PROMPT, images)) for images in requests]
            done: set = set()
            while len(done) < 4:  # the refusals come back while the tower is still held
                finished, _ = await asyncio.wait(set(calls) - done, timeout=30, return_when=asyncio.FIRST_COMPLETED)
                assert finished, f"{len(done)} answers, then none within 30 s"
                done |= finished
            computed = len(slow.computed)  # nothing admitted has been computed: only the request holding the tower
            depth = metric(server, "pickscore_queue_depth", tower="image")
            slow.release.set()
            return await asyncio.gather(*calls, return_exceptions=True), computed, depth

    with ServerThread(settings, backend=slow) as server, Client(server.address) as client:
        parked = _park(server, slow, client)
        results, computed, depth = asyncio.run(burst(server.address))
        assert len(parked.result(30)) == 1
        assert metric(server, "pickscore_admission_refusals_total", reason="queue_wait") == 4
    assert computed == 1 + warmup and depth == 33
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(refused) == 4 and sum(isinstance(r, list) and len(r) == 4 for r in results) == 8, results
    for refusal in refused:
        assert "image tower busy: 4 items would queue" in str(refusal) and "behind 33 admitted" in str(refusal)
        if warmup:
            bound, ms = auto_bound(refusal)
            assert bound == pytest.approx(32 * ms / 1000, rel=0.01)  # the bound is one measured batch time
            assert refusal.retry_after_s == pytest.approx(ms / 1000, abs=0.001)  # the one image over it drains (ms)
        else:
            assert "over auto's 32 (1 x the measured batch time, 32 items, nothing measured yet" in str(refusal)
            assert refusal.retry_after_s is None


def test_the_default_bound_follows_the_measured_service_time(tiny_hf_dir):
    """The same default admission over a tower 0.25 s an image slower: its bound, one measured batch time (4
    images here), is at least 4 x 0.25 s, and more than twice the fast tower's."""
    bounds = {}
    for per_item in (0.0, 0.25):
        backend = SlowBackend(str(tiny_hf_dir), per_item=per_item)
        try:
            with (
                ServerThread(settings_for(tiny_hf_dir, max_batch_size=4), backend=backend) as server,
                Client(server.address) as client,
            ):
                parked = _park(server, backend, client)
                full = _POOL.submit(client.score, PROMPT, [jpeg(i) for i in range(4)])  # 5 images ahead of the next
                wait_until(lambda: metric(server, "pickscore_queue_depth", tower="image") == 5, "5 images admitted")
                with pytest.raises(Overloaded) as refused:
                    client.score(PROMPT, [jpeg(9)])
                backend.release.set()
                assert len(full.result(30)) == 4 and len(parked.result(30)) == 1
        finally:
            backend.release.set()
        bound, ms = auto_bound(refused.value)
        assert bound == pytest.approx(4 * ms / 1000, rel=0.01)
        bounds[per_item] = bound
    assert bounds[0.25] >= 4 * 0.25 and bounds[0.25] > 2 * bounds[0.0], bounds


def test_a_refusal_on_a_stream_carries_its_retry_hint_in_band(tiny_hf_dir):
    """ScoreStream answers a refused request in-band; its retry hint is a field (Error.retry_after_ms), what a unary
    refusal's grpc-retry-pushback-ms trailer says, and the client hands it on as Overloaded.retry_after_s."""
    backend = SlowBackend(str(tiny_hf_dir), per_item=0.02)
    settings = settings_for(tiny_hf_dir, max_batch_size=8, max_queue_wait_s="0.3", stream_window=16)
    images = [pb.Image(data=jpeg(i)) for i in range(8)]
    requests = [
        pb.ScoreStreamRequest(tag=str(i), request=pb.ScoreRequest(prompt=PROMPT, images=images)) for i in range(32)
    ]
    with ServerThread(settings, backend=backend) as server:
        with grpc.insecure_channel(server.address) as channel:
            responses = list(scoring_pb2_grpc.ScoringServiceStub(channel).ScoreStream(iter(requests), timeout=120))
        refused = [r.error for r in responses if r.HasField("error")]
        assert refused and len(refused) < len(responses), len(refused)
        assert all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for e in refused)
        assert all(e.retry_after_ms > 0 for e in refused)
        hinted = [float(e.message.split("retry in ")[1].split(" s")[0]) for e in refused]  # the message says it too
        assert all(e.retry_after_ms == pytest.approx(h * 1000, rel=0.1, abs=10) for e, h in zip(refused, hinted))
        with Client(server.address) as client:
            _, errors = client.score_many(PROMPT, [jpeg(i) for i in range(256)], per_request=8, skip_invalid=True)
        assert errors and all(isinstance(e, Overloaded) and e.retry_after_s > 0 for e in errors.values())


def test_a_failed_image_takes_its_queued_siblings_out_before_they_cost_compute(tiny_hf_dir, slow):
    settings = settings_for(tiny_hf_dir, max_batch_size=4)
    with ServerThread(settings, backend=slow) as server, Client(server.address) as client:
        parked = _park(server, slow, client)
        siblings = [solid(GREEN, 64 + i) for i in range(6)]  # distinct bytes, one colour
        with pytest.raises(InvalidInput, match="image 6: not a decodable image"):
            client.score(PROMPT, [*siblings, b"not an image"])
        slow.release.set()
        assert len(parked.result(30)) == 1
        assert len(client.score(PROMPT, [jpeg(0)])) == 1  # the tower is free again and ran everything queued
    assert GREEN not in slow.computed, slow.computed


def test_a_caller_that_leaves_or_expires_costs_no_compute(tiny_hf_dir, slow):
    # admission by count alone: two requests queue behind the parked one, past auto's one batch of 4
    settings = settings_for(tiny_hf_dir, max_batch_size=4, max_queue_wait_s="0")
    with ServerThread(settings, backend=slow) as server, Client(server.address) as client:
        parked = _park(server, slow, client)
        channel = grpc.insecure_channel(server.address)
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        request = pb.ScoreRequest(prompt=PROMPT, images=[pb.Image(data=solid(GREEN, 64 + i)) for i in range(6)])
        gone = stub.Score.future(request, timeout=30)
        with pytest.raises(DeadlineExceeded):  # queued behind the parked request until its deadline passes
            client.score(PROMPT, [solid(GREEN, 80 + i) for i in range(6)], timeout=1.0)
        gone.cancel()
        time.sleep(0.5)  # the cancellation crosses the network
        slow.release.set()
        assert len(parked.result(30)) == 1
        assert len(client.score(PROMPT, [jpeg(0)])) == 1
        channel.close()
        assert metric(server, "pickscore_dropped_items_total", tower="image", reason="cancelled") >= 1
    assert GREEN not in slow.computed, slow.computed


def test_one_caller_cannot_take_every_slot(tiny_hf_dir, slow):
    settings = settings_for(tiny_hf_dir, max_inflight_per_client=1)
    with ServerThread(settings, backend=slow) as server:
        with (
            Client(server.address, metadata=[("x-client-id", "flood")]) as flood,
            Client(server.address, metadata=[("x-client-id", "other")]) as other,
        ):
            parked = _park(server, slow, flood)
            with pytest.raises(Overloaded, match="caller 'flood' already has 1 requests in flight, at most 1"):
                flood.score(PROMPT, [jpeg(1)])
            waiting = _POOL.submit(other.score, PROMPT, [jpeg(2)])  # admitted: its own slot
            slow.release.set()
            assert len(parked.result(30)) == 1 and len(waiting.result(30)) == 1
            assert len(flood.score(PROMPT, [jpeg(1)])) == 1  # its slot is back
            assert metric(server, "pickscore_admission_refusals_total", reason="client_limit") == 1


def test_priority_is_admitted_past_work_that_refuses_the_default_level(tiny_hf_dir):
    """Queue wait is counted at the request's own level: work at the default level does not delay level 1."""
    backend = SlowBackend(str(tiny_hf_dir), per_item=0.05)  # warm-up measures >= 50 ms an image
    settings = settings_for(tiny_hf_dir, max_queue_wait_s="0.2")
    with (
        ServerThread(settings, backend=backend) as server,
        Client(server.address) as client,
        triton.InferenceServerClient(server.address) as kserve,
    ):
        parked = _park(server, backend, client)
        queued = _POOL.submit(client.score, PROMPT, [jpeg(i) for i in range(6)])
        time.sleep(0.5)  # admitted: 7 images ahead of anything new at the default level, about 0.35 s or more

        def infer(priority: int):
            prompt = triton.InferInput("PROMPT", [1, 1], "BYTES")
            prompt.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
            image = triton.InferInput("IMAGE", [1, 1], "BYTES")
            image.set_data_from_numpy(np.array([[jpeg(9)]], dtype=object))
            return kserve.infer("pickscore", [prompt, image], priority=priority)

        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED.*image tower busy"):
            infer(0)
        urgent = _POOL.submit(infer, 1)
        time.sleep(0.2)
        backend.release.set()
        assert urgent and urgent.result(30).as_numpy("SCORE").shape == (1, 1)
        assert len(queued.result(30)) == 6 and len(parked.result(30)) == 1


def test_a_hung_tower_fails_its_batch_and_takes_the_replica_out(tiny_hf_dir, slow):
    settings = settings_for(tiny_hf_dir, batch_timeout_s=0.5, grace_period_s=1.0)
    with ServerThread(settings, backend=slow) as server, Client(server.address) as client:
        start = time.perf_counter()
        with pytest.raises(Internal, match="image tower did not return a batch of 1 in 0.5 s"):
            client.score(PROMPT, [solid(MAGENTA)])
        assert time.perf_counter() - start < 10  # the watchdog answered, not the client's 60 s deadline
        # the text tower shares the stuck thread: its watchdog may fire first, and the replica names the first
        with pytest.raises(Unavailable, match="(image|text) tower is hung"):
            client.score(PROMPT, [jpeg(0)])
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", LIVENESS_SERVICE):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING, service
        assert metric(server, "pickscore_tower_hung", tower="image") == 1
        assert metric(server, "pickscore_requests_total", rpc="Score", code="INTERNAL") == 1
