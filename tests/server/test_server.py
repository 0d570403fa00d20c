"""The scoring.v1 API through a real gRPC server on loopback, with our clients and raw grpc stubs."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pickscore.client import AsyncClient, Client
from pickscore.scorer import Scorer
from pickscore.server.app import ServerThread
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc
from tests.server.conftest import PROMPT, jpeg, metric, settings_for

PROMPTS = ["a red square on a blue background", "two green circles", "a yellow star at the top", "a black triangle"]


@pytest.fixture(scope="module")
def reference(tiny_hf_dir):
    return Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")


def test_concurrent_clients_match_in_process_scoring_and_batches_form(server, reference):
    images = [jpeg(i) for i in range(8)]
    jobs = [(PROMPTS[k % len(PROMPTS)], images[k % 5 : k % 5 + 3]) for k in range(48)]
    batches_before = metric(server, "pickscore_batch_size_count", tower="image")
    items_before = metric(server, "pickscore_batch_size_sum", tower="image")

    # 8 callers of 3 images: within the default admission bound of one batch (32 images) ahead
    with Client(server.address) as client, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: client.score(*job), jobs))

    for (prompt, imgs), scores in zip(jobs, got):
        np.testing.assert_allclose(scores, reference.score(prompt, imgs), atol=1e-5, rtol=0)
    batches = metric(server, "pickscore_batch_size_count", tower="image") - batches_before
    items = metric(server, "pickscore_batch_size_sum", tower="image") - items_before
    assert items == 3 * len(jobs)
    assert items / batches > 1.5, f"{items} images in {batches} forward passes: batches did not form"
    assert metric(server, "pickscore_batch_size_bucket", tower="image", le="1.0") < batches  # some batch > 1


def test_asyncio_client_and_pairs(server, reference):
    images = [jpeg(i) for i in range(4)]

    async def run():
        async with AsyncClient(server.address) as client:
            return await asyncio.gather(
                client.score(PROMPT, images), client.score_pairs(PROMPTS, images), client.rank(PROMPT, images, top_k=2)
            )

    scores, pairs, ranking = asyncio.run(run())
    np.testing.assert_allclose(scores, reference.score(PROMPT, images), atol=1e-5)
    expected_pairs = [reference.score(p, [img])[0] for p, img in zip(PROMPTS, images)]
    np.testing.assert_allclose(pairs, expected_pairs, atol=1e-5)
    expected = reference.rank(PROMPT, images, top_k=2)
    assert ranking.order == expected.order
    np.testing.assert_allclose(ranking.probabilities, expected.probabilities, atol=1e-5)


def test_rank_with_raw_stubs_returns_best_first_with_ids(server, reference):
    images = [jpeg(i) for i in range(6)]
    with grpc.insecure_channel(server.address) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        request = pb.RankRequest(
            prompt=PROMPT, top_k=3, images=[pb.Image(data=d, id=f"cand-{i}") for i, d in enumerate(images)]
        )
        response = stub.Rank(request, timeout=30)
    expected = reference.rank(PROMPT, images)
    assert [r.index for r in response.ranking] == expected.order[:3]
    assert [r.id for r in response.ranking] == [f"cand-{i}" for i in expected.order[:3]]
    np.testing.assert_allclose(
        [r.probability for r in response.ranking], [expected.probabilities[i] for i in expected.order[:3]], atol=1e-5
    )
    assert all(a.score >= b.score for a, b in zip(response.ranking, response.ranking[1:]))


def test_score_stream_answers_every_request_and_reports_bad_ones_in_band(server, reference):
    images = [jpeg(i) for i in range(10)]
    requests = [
        pb.ScoreStreamRequest(tag=f"t{i}", request=pb.ScoreRequest(prompt=PROMPT, images=[pb.Image(data=d)]))
        for i, d in enumerate(images)
    ]
    requests.insert(
        4, pb.ScoreStreamRequest(tag="bad", request=pb.ScoreRequest(prompt=PROMPT, images=[pb.Image(data=b"nope")]))
    )
    with grpc.insecure_channel(server.address) as channel:
        responses = list(scoring_pb2_grpc.ScoringServiceStub(channel).ScoreStream(iter(requests), timeout=60))
    by_tag = {r.tag: r for r in responses}
    assert sorted(by_tag) == sorted(r.tag for r in requests)
    assert by_tag["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "image 0: not a decodable image" in by_tag["bad"].error.message
    expected = reference.score(PROMPT, images)
    np.testing.assert_allclose([by_tag[f"t{i}"].response.results[0].score for i in range(10)], expected, atol=1e-5)


def test_score_many_streams_large_jobs_and_skips_bad_items(server, reference):
    images = [jpeg(i) for i in range(12)]
    with Client(server.address) as client:
        scores, errors = client.score_many(PROMPT, images[:5] + [b"junk"] + images[5:], skip_invalid=True)
        chunked, none = client.score_many(PROMPT, images, per_request=5)
    assert list(errors) == [5] and "#5" in str(errors[5])
    np.testing.assert_allclose(np.delete(scores, 5), reference.score(PROMPT, images), atol=1e-5)
    assert none == {}
    np.testing.assert_allclose(chunked, reference.score(PROMPT, images), atol=1e-5)


def test_model_info_health_and_reflection(server):
    with Client(server.address) as client:
        info = client.model_info()
    assert (info.backend, info.device, info.embed_dim, info.image_size, info.context_length) == (
        "torch",
        "cpu fp32",
        16,
        224,
        77,
    )
    assert info.max_images_per_request == 256
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pickscore.v1.ScoringService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        )
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"pickscore.v1.ScoringService", "grpc.health.v1.Health"} <= names


def test_text_cache_serves_repeated_prompts(server):
    prompt = "a prompt sent twice"
    with Client(server.address) as client:
        hits = metric(server, "pickscore_cache_hits_total", cache="text")
        misses = metric(server, "pickscore_cache_misses_total", cache="text")
        first = client.score(prompt, [jpeg(1)])
        second = client.score(prompt, [jpeg(1)])
    assert first == second
    assert metric(server, "pickscore_cache_misses_total", cache="text") == misses + 1
    assert metric(server, "pickscore_cache_hits_total", cache="text") == hits + 1


def test_image_cache_when_enabled(tiny_hf_dir, reference):
    settings = settings_for(tiny_hf_dir, image_cache_bytes=1 << 20)
    with ServerThread(settings) as server, Client(server.address) as client:
        image = jpeg(3)
        a = client.score("one prompt", [image])
        b = client.score("another prompt", [image, jpeg(4)])
        assert metric(server, "pickscore_cache_hits_total", cache="image") == 1
        assert metric(server, "pickscore_cache_misses_total", cache="image") == 2
        assert metric(server, "pickscore_batch_size_sum", tower="image") == 1 + 2  # warm-up + two distinct images
    np.testing.assert_allclose(
        a + b, reference.score("one prompt", [image]) + reference.score("another prompt", [image, jpeg(4)]), atol=1e-5
    )


def test_metrics_endpoint_exposes_every_family(server):
    with Client(server.address) as client:
        client.score(PROMPT, [jpeg(0), jpeg(1)])
    from tests.server.conftest import scrape

    text = scrape(server)
    for name in (
        "pickscore_request_duration_seconds_bucket",
        "pickscore_requests_total",
        "pickscore_queue_wait_seconds_bucket",
        "pickscore_preprocess_seconds_bucket",
        "pickscore_inference_seconds_bucket",
        "pickscore_batch_size_bucket",
        "pickscore_images_scored_total",
        "pickscore_cache_hits_total",
        "pickscore_cache_misses_total",
        "pickscore_queue_depth",
        "pickscore_inflight_requests",
        "pickscore_model_info",
    ):
        assert name in text, name
    assert metric(server, "pickscore_requests_total", rpc="Score", code="OK") >= 1
    assert metric(server, "pickscore_preprocess_seconds_count", stage="decode") >= 1  # a request's images: one call
    assert metric(server, "pickscore_images_decoded_total") >= 2
