"""Every row of docs/DESIGN.md's error table, produced by a real request to a real server."""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from pickscore.backends.torch_backend import TorchBackend
from pickscore.client import Client
from pickscore.client.channel import _SERVICE_CONFIG
from pickscore.errors import DeadlineExceeded, Internal, Overloaded, Unauthenticated, Unavailable
from pickscore.model.checkpoint import resolve
from pickscore.model.preprocess import load_uint8
from pickscore.scorer import Scorer
from pickscore.server.app import ServerThread
from pickscore.status import error_for
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc
from tests.conftest import png_bomb
from tests.server.conftest import PROMPT, jpeg, metric, settings_for


def _stub(server):
    channel = grpc.insecure_channel(server.address)
    return channel, scoring_pb2_grpc.ScoringServiceStub(channel)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b"", "empty image data"),
        (b"this is text, not an image", "not a decodable image"),
        (jpeg(1)[:300], "Truncated"),
        (png_bomb(), "pixels"),
    ],
)
def test_bad_image_is_invalid_argument_naming_the_item(server, bad, reason):
    channel, stub = _stub(server)
    with channel:
        images = [pb.Image(data=jpeg(0), id="ok"), pb.Image(data=bad, id="the-bad-one"), pb.Image(data=jpeg(2))]
        code, details = _code(lambda: stub.Score(pb.ScoreRequest(prompt=PROMPT, images=images), timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("image 1 (id 'the-bad-one'): ") and reason in details, details
        # nothing else disturbed: the next request on the same channel is fine
        assert len(stub.Score(pb.ScoreRequest(prompt=PROMPT, images=images[:1]), timeout=30).results) == 1


@pytest.mark.parametrize(
    "request_, message",
    [
        (pb.ScoreRequest(prompt=PROMPT), "no images given"),
        (pb.ScoreRequest(images=[pb.Image(data=jpeg(0))]), "prompt is empty"),
        (pb.ScoreRequest(prompt=PROMPT, prompts=["a", "b"], images=[pb.Image(data=jpeg(0))] * 2), "not both"),
        (pb.ScoreRequest(prompts=["a", "b", "c"], images=[pb.Image(data=jpeg(0))] * 2), "3 prompts for 2 images"),
        (pb.ScoreRequest(prompts=["a", " "], images=[pb.Image(data=jpeg(0))] * 2), "prompt 1 is empty"),
        (
            pb.ScoreRequest(prompt=PROMPT, images=[pb.Image(data=jpeg(0))] * 257),
            "257 images in one request; at most 256",
        ),
    ],
)
def test_bad_fields_are_invalid_argument(server, request_, message):
    channel, stub = _stub(server)
    with channel:
        code, details = _code(lambda: stub.Score(request_, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details


def test_oversized_image_bytes_and_zero_top_k(tiny_hf_dir):
    with ServerThread(settings_for(tiny_hf_dir, max_image_bytes=1000)) as server:
        channel, stub = _stub(server)
        with channel:
            big = jpeg(0, size=256)
            code, details = _code(
                lambda: stub.Rank(pb.RankRequest(prompt=PROMPT, images=[pb.Image(data=big)]), timeout=30)
            )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"image 0: {len(big)} bytes; at most 1000" in details


def big_jpeg(seed: int, side: int = 1536) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_full_queue_is_resource_exhausted_at_once_while_admitted_requests_succeed(tiny_hf_dir):
    images = [big_jpeg(i) for i in range(8)]  # slow to decode, so requests overlap
    settings = settings_for(tiny_hf_dir, max_queue_size=8, max_images_per_request=8, max_batch_size=8)
    with ServerThread(settings) as server, Client(server.address) as client:
        expected = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32").score(PROMPT, images)

        def call(_):
            try:
                return client.score(PROMPT, images)
            except Overloaded as e:
                return e

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(call, range(12)))
        registry = server.server.state.metrics.registry

        def served_s(code: str) -> float:
            """The server's own mean time from a Score request's arrival to its answer: not the wire's 28 MB."""
            labels = {"transport": "grpc", "rpc": "Score", "code": code}
            total = registry.get_sample_value("pickscore_request_duration_seconds_sum", labels)
            return total / registry.get_sample_value("pickscore_request_duration_seconds_count", labels)

        refused_s, admitted_s = served_s("RESOURCE_EXHAUSTED"), served_s("OK")
    ok = [r for r in results if not isinstance(r, Exception)]
    rejected = [r for r in results if isinstance(r, Overloaded)]
    assert ok and rejected, results
    for scores in ok:
        np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert all("image queue full" in str(e) for e in rejected)
    # "at once": a rejection never waits for the work ahead of it. The callers' own times also hold each message's
    # transfer (8 images of 3.5 MB, twelve at once), which on a loaded machine took the refused as long as the
    # admitted; the server's time from arrival to answer does not.
    assert refused_s < admitted_s / 10, (refused_s, admitted_s)


def test_expired_deadline_never_reaches_the_backend(tiny_hf_dir):
    settings = settings_for(tiny_hf_dir, max_queue_delay_ms=1500, max_batch_size=64, text_cache_bytes=0)
    with ServerThread(settings) as server, Client(server.address) as client:
        passes = metric(server, "pickscore_inference_seconds_count")
        with pytest.raises(DeadlineExceeded):
            client.score(PROMPT, [jpeg(0)], timeout=0.3)
        time.sleep(1.6)  # past the batch's close: by now it would have run
        assert metric(server, "pickscore_inference_seconds_count") == passes
        assert metric(server, "pickscore_dropped_items_total", tower="image") == 1
        assert metric(server, "pickscore_dropped_items_total", tower="text") == 1


def test_server_side_deadline_is_deadline_exceeded_and_never_computed(tiny_hf_dir):
    """KServe's ``timeout`` parameter is a deadline the server enforces itself (the client sets none)."""
    import tritonclient.grpc as triton

    settings = settings_for(tiny_hf_dir, max_queue_delay_ms=1500, max_batch_size=64, text_cache_bytes=0)
    with ServerThread(settings) as server, triton.InferenceServerClient(server.address) as client:
        passes = metric(server, "pickscore_inference_seconds_count")
        prompt = triton.InferInput("PROMPT", [1, 1], "BYTES")
        prompt.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
        image = triton.InferInput("IMAGE", [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[jpeg(0)]], dtype=object))
        with pytest.raises(Exception) as info:
            client.infer("pickscore", [prompt, image], timeout=300_000)  # 0.3 s, in microseconds
        assert "DEADLINE_EXCEEDED" in str(info.value) and "before the towers answered" in str(info.value)
        assert metric(server, "pickscore_inference_seconds_count") == passes
        # the server answers at the deadline itself (the client set none) and both items leave their queues
        time.sleep(1.6)  # past the batches' close: by now they would have run
        assert metric(server, "pickscore_inference_seconds_count") == passes
        assert metric(server, "pickscore_dropped_items_total") == 2
        assert metric(server, "pickscore_requests_total", rpc="ModelInfer", code="DEADLINE_EXCEEDED") == 1


class FlakyBackend(TorchBackend):
    """The real torch backend, failing any batch that holds a pure-magenta image (fault injection)."""

    def __init__(self, ref: str):
        super().__init__(resolve(ref))
        self.poison = load_uint8(solid((255, 0, 255)), self.preprocess)[0, 0]  # (3,) magenta, as the crop holds it

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        if any(np.array_equal(p[0, 0], self.poison) for p in pixels):  # (B, H, W, 3) uint8 crops
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return super().encode_image(pixels)


def solid(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), rgb).save(buf, "PNG")
    return buf.getvalue()


def test_backend_failure_fails_only_its_batch_and_the_server_keeps_serving(tiny_hf_dir):
    # one image per batch, so batches are told apart; admission by count alone, as 7 requests queue past one batch
    settings = settings_for(tiny_hf_dir, max_batch_size=1, max_queue_wait_s="0")
    with ServerThread(settings, backend=FlakyBackend(str(tiny_hf_dir))) as server, Client(server.address) as client:
        with ThreadPoolExecutor(8) as pool:
            good = [pool.submit(client.score, PROMPT, [jpeg(i)]) for i in range(6)]
            bad = pool.submit(client.score, PROMPT, [solid((255, 0, 255))])
            with pytest.raises(Internal, match="image tower failed on a batch of 1: RuntimeError: CUDA error"):
                bad.result()
            assert all(len(f.result()) == 1 for f in good)
        assert len(client.score(PROMPT, [jpeg(9)])) == 1  # still serving
        assert metric(server, "pickscore_batch_failures_total", tower="image") == 1
        assert metric(server, "pickscore_requests_total", rpc="Score", code="INTERNAL") == 1


def test_auth_token_gives_unauthenticated_without_it(tiny_hf_dir):
    with ServerThread(settings_for(tiny_hf_dir, auth_token="s3cret")) as server:
        with Client(server.address) as anonymous, pytest.raises(Unauthenticated, match="missing credentials"):
            anonymous.score(PROMPT, [jpeg(0)])
        with (
            Client(server.address, metadata=[("authorization", "Bearer wrong")]) as wrong,
            pytest.raises(Unauthenticated, match="wrong credentials"),
        ):
            wrong.score(PROMPT, [jpeg(0)])
        with Client(server.address, metadata=[("authorization", "Bearer s3cret")]) as client:
            assert len(client.score(PROMPT, [jpeg(0)])) == 1
        with grpc.insecure_channel(server.address) as channel:  # health needs no credentials
            assert (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            )


def test_request_during_drain_is_unavailable_and_admitted_work_finishes(tiny_hf_dir):
    images = [big_jpeg(i) for i in range(16)]
    server = ServerThread(settings_for(tiny_hf_dir, grace_period_s=60)).__enter__()
    try:
        with Client(server.address) as client, ThreadPoolExecutor(2) as pool:
            long = pool.submit(client.score, PROMPT, images)
            while server.server.state.inflight == 0:
                time.sleep(0.005)
            drained = threading.Thread(target=server.stop)
            drained.start()
            while not server.server.state.draining:
                time.sleep(0.005)
            with pytest.raises(Unavailable, match="draining"):
                client.score(PROMPT, [jpeg(0)])
            with grpc.insecure_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                alive = health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING  # readiness: take it out of rotation
            assert alive == health_pb2.HealthCheckResponse.SERVING  # liveness: do not kill it while it finishes
            assert len(long.result(timeout=60)) == 16  # admitted before the drain: finished
            drained.join(timeout=60)
    finally:
        server.stop()


def test_a_call_a_shutting_down_server_cancelled_is_unavailable():
    """gRPC core answers calls no handler took yet with CANCELLED when the server stops (grpc/grpc#41785): to the
    caller, who cancelled nothing, the replica went away; the channel retries it like UNAVAILABLE."""
    assert isinstance(error_for(grpc.StatusCode.CANCELLED, "server: CANCELLED: CANCELLED"), Unavailable)
    (policy,) = json.loads(_SERVICE_CONFIG)["methodConfig"]
    assert set(policy["retryPolicy"]["retryableStatusCodes"]) == {"UNAVAILABLE", "CANCELLED"}
