"""A bad image is named by its place in the caller's call on every path the jobs score through: in-process, a
server's client (several requests, a stream) and the reward client's groups over gRPC and HTTP."""

from __future__ import annotations

import pytest

from pickscore.client import Client, RewardClient
from pickscore.errors import InvalidInput
from pickscore.scorer import Scorer
from pickscore.server.app import ServerThread
from tests.server.conftest import PROMPT, jpeg, settings_for

GOOD = [jpeg(i) for i in range(6)]
IMAGES = [GOOD[0], GOOD[1], GOOD[2], b"not an image", GOOD[4], b"junk too"]  # images 3 and 5 are bad


@pytest.fixture(scope="module")
def server(tiny_hf_dir):
    with ServerThread(settings_for(tiny_hf_dir, max_images_per_request=2)) as s:  # a call of 6 is 3 requests
        yield s


def test_in_process(tiny_hf_dir):
    scorer = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")
    _, errors = scorer.score_all(PROMPT, IMAGES, skip_invalid=True)
    assert {k: str(e).split(":")[0] for k, e in errors.items()} == {3: "image 3", 5: "image 5"}


def test_a_servers_stream_and_split_calls(server):
    with Client(server.address) as client:
        _, one_a_request = client.score_many(PROMPT, IMAGES, skip_invalid=True)
        _, two_a_request = client.score_many(PROMPT, IMAGES, per_request=2, skip_invalid=True)
        with pytest.raises(InvalidInput) as refused:  # the second of three requests is refused
            client.score(PROMPT, IMAGES[:4])
    assert {k: str(e) for k, e in one_a_request.items()} == {
        3: "server: image 3 (id '#3'): not a decodable image (cannot identify image file; supported: JPEG, PNG, "
        "WEBP, GIF, BMP, TIFF)",
        5: "server: image 5 (id '#5'): not a decodable image (cannot identify image file; supported: JPEG, PNG, "
        "WEBP, GIF, BMP, TIFF)",
    }
    # Keyed by the first image of each failed request, each naming its bad image.
    assert {k: str(e).split(" (")[0] for k, e in two_a_request.items()} == {2: "server: image 3", 4: "server: image 5"}
    assert str(refused.value).startswith("server: INVALID_ARGUMENT: image 3: not a decodable image")


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_reward_client_groups(server, transport):
    address = server.address if transport == "grpc" else f"http://127.0.0.1:{server.server.http_port}"
    with RewardClient(address) as rewards:
        group = rewards.submit_group(PROMPT, IMAGES[2:])  # its images 1 and 3 are bad
        with pytest.raises(InvalidInput, match=r"^server: (INVALID_ARGUMENT|HTTP 400): image 1: not a decodable"):
            group.result(timeout=60)
