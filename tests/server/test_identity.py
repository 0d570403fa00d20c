"""A served model's identity (NAME:KIND:PRECISION:DIGEST16, backends.model_identity) is one string wherever it is read:
GetModelInfo and ListModels (gRPC, the sync and async clients), /v1/model and /v1/models over HTTP, KServe model
metadata (tritonclient.http) and configuration parameters (tritonclient.grpc and .http), the model_info metric's
identity label and the "model loaded" log line; it equals the in-process Scorer's for the same weights and
precision, and a swap to other weights in a watched repository changes it (and back to the same weights, back)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from pickscore import Scorer
from pickscore.client import AsyncClient, Client
from pickscore.server.app import ServerThread
from tests.backends.test_identity import perturbed_hf_dir
from tests.server.conftest import metric, scrape, settings_for
from tests.server.test_http import get
from tests.server.test_models import version


def test_the_identity_is_one_string_on_every_surface_and_the_in_process_ones(server, tiny_hf_dir):
    expected = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32").identity
    assert re.fullmatch(r"pickscore:clip:fp32:[0-9a-f]{16}", expected)
    with Client(server.address) as client:
        assert client.model_info().identity == expected
        assert [m.identity for m in client.list_models()] == [expected]

    async def over_asyncio():
        async with AsyncClient(server.address) as client:
            return (await client.model_info()).identity, [m.identity for m in await client.list_models()]

    assert asyncio.run(over_asyncio()) == (expected, [expected])
    for path in ("/v1/model", "/v1/models/pickscore"):
        status, _, body = get(server, path)
        assert status == 200 and json.loads(body)["identity"] == expected, path
    assert [m["identity"] for m in json.loads(get(server, "/v1/models")[2])["models"]] == [expected]

    with (
        triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}") as http,
        triton_grpc.InferenceServerClient(server.address) as grpc_client,
    ):
        for name in ("pickscore", "pickscore_image", "pickscore_text"):  # the towers are the same model's
            assert http.get_model_metadata(name)["identity"] == expected
            assert http.get_model_config(name)["parameters"]["identity"]["string_value"] == expected
            assert grpc_client.get_model_config(name).config.parameters["identity"].string_value == expected
            assert grpc_client.get_model_metadata(name).name == name  # no field for it there: still answered
    assert metric(server, "pickscore_model_info", model="pickscore", identity=expected) == 1


def test_a_watched_repository_swap_changes_the_identity_everywhere(tmp_path, tiny_hf_dir, caplog):
    root = tmp_path / "repository"
    root.mkdir()
    version(root, "m", 1, tiny_hf_dir)
    settings = settings_for("unused", model_repository=str(root), model_control_mode="poll", repository_poll_s=0.2)
    with (
        caplog.at_level(logging.INFO, logger="pickscore.server"),
        ServerThread(settings) as server,
        Client(server.address, model="m") as client,
    ):

        def served() -> tuple[str, str]:
            info = client.list_models()[0]
            return info.model_version, info.identity

        def swapped_to(number: int, source) -> str:
            version(root, "m", number, source)
            deadline = time.monotonic() + 60
            while served()[0] != str(number) and time.monotonic() < deadline:
                time.sleep(0.1)
            number_served, identity = served()
            assert number_served == str(number)
            while f'identity="{identity}"' not in scrape(server) and time.monotonic() < deadline:
                time.sleep(0.1)
            return identity

        first = served()[1]
        digest = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32").identity.rsplit(":", 1)[1]
        assert first == f"m:clip:fp32:{digest}"  # named by its repository directory, the weights' digest
        second = swapped_to(2, perturbed_hf_dir(tmp_path / "perturbed"))  # one weight moved by 1e-3
        assert second != first and second.startswith("m:clip:fp32:")
        deadline = time.monotonic() + 30
        while f'identity="{first}"' in scrape(server) and time.monotonic() < deadline:
            time.sleep(0.1)  # the old version drains, then its series goes
        assert metric(server, "pickscore_model_info", model="m", identity=second) == 1
        assert f'identity="{first}"' not in scrape(server)
        assert json.loads(get(server, "/v1/models/m")[2])["identity"] == second
        assert swapped_to(3, tiny_hf_dir) == first  # the first weights again: the first identity
    loaded = [r for r in caplog.records if r.getMessage() == "model loaded"]
    assert [(r.model_version, r.identity) for r in loaded] == [("1", first), ("2", second), ("3", first)]
