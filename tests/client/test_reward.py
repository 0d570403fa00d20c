"""The reward client for RL trainers against a real server, over gRPC and over HTTP: it overlaps scoring with
generation, scores as scoring.v1 does, retries refusals, isolates a bad image, and turns an outage into zeros
and a warning when the reward is not required."""

from __future__ import annotations

import socket
import time
from concurrent.futures import wait

import numpy as np
import pytest

from pickscore.client import Client, RewardClient
from pickscore.errors import InvalidInput, Unavailable
from pickscore.server.app import ServerThread
from tests.server.conftest import PROMPT, jpeg, metric, settings_for

IMAGES = [jpeg(i) for i in range(6)]


def address(server: ServerThread, transport: str) -> str:
    return server.address if transport == "grpc" else f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def expected(server):
    with Client(server.address) as client:
        return np.array(client.score(PROMPT, IMAGES))


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_scoring_overlaps_generation(server, expected, transport):
    """A slow generator yields images one at a time; the first image's reward is in before the last image
    exists. The generator waits (bounded) for it before making the last one: without overlap it would wait
    out the bound and the ordering below would be reversed."""
    events: list[tuple[str, int]] = []
    with RewardClient(address(server, transport), max_delay_s=0.01) as rewards:
        futures = []

        def generate():
            for i, image in enumerate(IMAGES):
                if i == len(IMAGES) - 1:
                    wait([futures[0]], timeout=20)
                else:
                    time.sleep(0.05)  # the diffusion model at work
                events.append(("generated", i))
                yield image

        for i, image in enumerate(generate()):
            future = rewards.submit(PROMPT, image)
            future.add_done_callback(lambda _, i=i: events.append(("scored", i)))
            futures.append(future)
        scores = [f.result(30) for f in futures]
    assert events.index(("scored", 0)) < events.index(("generated", len(IMAGES) - 1)), events
    np.testing.assert_allclose(scores, expected, atol=1e-6)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_scales_groups_and_pixels(server, expected, transport):
    from PIL import Image

    pil = Image.open(__import__("io").BytesIO(IMAGES[0]))
    with RewardClient(address(server, transport), scale="div26") as rewards:
        scaled = [rewards.submit(PROMPT, image) for image in IMAGES]
        probabilities = rewards.submit_group(PROMPT, IMAGES, softmax=True).result(30)
        raw_group = rewards.submit_group(PROMPT, IMAGES).result(30)
        from_pixels = rewards.submit(PROMPT, pil).result(30)
        for softmax in (False, True):  # an empty group is answered, not left waiting forever
            assert rewards.submit_group(PROMPT, [], softmax=softmax).result(30).shape == (0,)
    np.testing.assert_allclose([f.result(30) for f in scaled], expected / 26, atol=1e-6)
    np.testing.assert_allclose(raw_group, expected / 26, atol=1e-6)
    softmax = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    np.testing.assert_allclose(probabilities, softmax, atol=1e-5)  # over the raw scores, whatever the scale
    with Client(server.address) as client:  # a PIL image goes as its pixels: the score of those pixels
        np.testing.assert_allclose(
            from_pixels, client.score(PROMPT, [np.asarray(pil.convert("RGB"))])[0] / 26, atol=1e-6
        )


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_refusals_are_retried_and_a_bad_image_fails_alone(tiny_hf_dir, transport):
    settings = settings_for(tiny_hf_dir, max_inflight_per_client=1)
    with ServerThread(settings) as server, Client(server.address) as client:
        expected = client.score(PROMPT, IMAGES)
        with RewardClient(
            address(server, transport), max_batch=1, max_inflight=6, metadata=[("x-client-id", "trainer")]
        ) as rewards:
            futures = [rewards.submit(PROMPT, image) for image in IMAGES]
            scores = [f.result(60) for f in futures]
            bad = [rewards.submit(PROMPT, image) for image in (IMAGES[0], b"not an image", IMAGES[1])]
            with pytest.raises(InvalidInput, match="not a decodable image"):
                bad[1].result(30)
            assert [bad[0].result(30), bad[2].result(30)] == pytest.approx(expected[:2], abs=1e-6)
        np.testing.assert_allclose(scores, expected, atol=1e-6)
        assert metric(server, "pickscore_admission_refusals_total", reason="client_limit") > 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_an_outage_is_zeros_and_a_warning_unless_required(transport):
    port = _closed_port()
    target = f"127.0.0.1:{port}" if transport == "grpc" else f"http://127.0.0.1:{port}"
    with pytest.warns(UserWarning, match="PickScore reward unavailable, 2 images scored 0"):
        with RewardClient(target, required=False, timeout=1.0) as rewards:
            futures = [rewards.submit(PROMPT, image) for image in IMAGES[:2]]
            assert [f.result(30) for f in futures] == [0.0, 0.0]
    with RewardClient(target, timeout=1.0) as rewards:
        with pytest.raises(Unavailable):
            rewards.submit(PROMPT, IMAGES[0]).result(30)
