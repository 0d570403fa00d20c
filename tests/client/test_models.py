"""The clients, the reward client, the places and the CLI choose among a real server's models (two, on loopback):
each model scores as it does in process, the default is the default, an unknown one is NotFound naming it and
what is served, and rewards from several models are the weighted sums of their separate scores."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from pickscore import Scorer
from pickscore.cli import main
from pickscore.client import AsyncClient, Client, RewardClient
from pickscore.errors import InvalidInput, NotFound
from pickscore.places import open_place
from pickscore.server.app import ServerThread
from tests.server.conftest import PROMPT, jpeg, settings_for

IMAGES = [jpeg(i) for i in range(4)]
WEIGHTS = {"pickscore": 1.0, "other": 0.5}


@pytest.fixture(scope="module")
def two(tiny_hf_dir, other_hf_dir):
    with ServerThread(settings_for(f"pickscore={tiny_hf_dir},other={other_hf_dir}")) as server:
        yield server


@pytest.fixture(scope="module")
def expected(tiny_hf_dir, other_hf_dir) -> dict[str, np.ndarray]:
    out = {}
    for name, directory in (("pickscore", tiny_hf_dir), ("other", other_hf_dir)):
        scorer = Scorer.from_pretrained(directory, device="cpu", dtype="fp32")
        out[name] = np.array(scorer.score(PROMPT, IMAGES))
        scorer.close()
    out["weighted"] = WEIGHTS["pickscore"] * out["pickscore"] + WEIGHTS["other"] * out["other"]
    return out


def http(server: ServerThread) -> str:
    return f"http://127.0.0.1:{server.server.http_port}"


def test_each_client_scores_with_its_model(two, expected, other_hf_dir):
    with Client(two.address) as default, Client(two.address, model="other") as other:
        np.testing.assert_allclose(default.score(PROMPT, IMAGES), expected["pickscore"], atol=1e-5)
        np.testing.assert_allclose(other.score(PROMPT, IMAGES), expected["other"], atol=1e-5)
        np.testing.assert_allclose(other.score_pairs([PROMPT] * 4, IMAGES), expected["other"], atol=1e-5)
        np.testing.assert_allclose(other.rank(PROMPT, IMAGES).scores, expected["other"], atol=1e-5)
        streamed, errors = other.score_many(PROMPT, IMAGES, per_request=3)
        np.testing.assert_allclose(streamed, expected["other"], atol=1e-5)
        assert errors == {}
        info = other.model_info()
        assert (info.model, info.source) == ("other", str(other_hf_dir))
        assert default.model_info().model == "pickscore"

    async def asynchronously() -> list[float]:
        async with AsyncClient(two.address, model="other") as client:
            return await client.score(PROMPT, IMAGES)

    np.testing.assert_allclose(asyncio.run(asynchronously()), expected["other"], atol=1e-5)


def test_a_model_not_served_is_not_found_naming_it_and_the_served_ones(two):
    named = r"model 'nope' is not served; this server serves (pickscore, other|other, pickscore)"
    with Client(two.address, model="nope") as client, pytest.raises(NotFound, match=named):
        client.score(PROMPT, IMAGES)
    with Client(two.address) as client, pytest.raises(NotFound, match=named):
        client.rewards(PROMPT, IMAGES, models={"pickscore": 1.0, "nope": 1.0})
    with RewardClient(two.address, model="nope") as rewards, pytest.raises(NotFound, match=named):
        rewards.submit(PROMPT, IMAGES[0]).result(30)


def test_list_models_names_both_with_their_weights(two, tiny_hf_dir, other_hf_dir):
    with Client(two.address) as client:
        models = {m.model: m for m in client.list_models()}
        assert client.list_models()[0].model == "pickscore"  # the default first
    assert sorted(models) == ["other", "pickscore"]
    assert models["other"].source == str(other_hf_dir) and models["pickscore"].source == str(tiny_hf_dir)
    assert all(m.weights_bytes > 0 for m in models.values())
    assert models["other"].weights_bytes != models["pickscore"].weights_bytes  # another shape


def test_rewards_are_the_weighted_sum_of_each_models_scores(two, expected):
    with Client(two.address) as client:
        answer = client.rewards(PROMPT, IMAGES, models=WEIGHTS)
        paired = client.rewards("", IMAGES, models=[("other", 2.0)], prompts=[PROMPT] * 4)
        alone = client.rewards(PROMPT, IMAGES)  # no models: the default, weight 1
    np.testing.assert_allclose(answer.rewards, expected["weighted"], atol=1e-4)
    assert list(answer.models) == ["pickscore", "other"]
    for name, part in answer.models.items():
        assert part.weight == WEIGHTS[name] and part.version
        np.testing.assert_allclose(part.scores, expected[name], atol=1e-5)
        np.testing.assert_array_equal(part.normalized, part.scores)  # normalize "none"
    np.testing.assert_allclose(paired.rewards, 2 * expected["other"], atol=1e-4)
    np.testing.assert_allclose(alone.rewards, expected["pickscore"], atol=1e-5)

    async def asynchronously():
        async with AsyncClient(two.address) as client:
            return await client.rewards(PROMPT, IMAGES, models=WEIGHTS)

    np.testing.assert_allclose(asyncio.run(asynchronously()).rewards, expected["weighted"], atol=1e-4)
    with Client(two.address) as client, pytest.raises(ValueError, match="normalize 'z'"):
        client.rewards(PROMPT, IMAGES, models=WEIGHTS, normalize="z")


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_reward_client_with_one_model_or_a_weighted_sum(two, expected, transport):
    address = two.address if transport == "grpc" else http(two)
    with RewardClient(address, model="other") as rewards:
        one = [rewards.submit(PROMPT, image) for image in IMAGES]
        np.testing.assert_allclose([f.result(30) for f in one], expected["other"], atol=1e-5)
    with RewardClient(address, models=WEIGHTS, max_delay_s=0.05) as rewards:
        futures = [rewards.submit(PROMPT, image) for image in [*IMAGES, b"not an image"]]
        group = rewards.submit_group(PROMPT, IMAGES).result(30)
        np.testing.assert_allclose([f.result(30) for f in futures[:-1]], expected["weighted"], atol=1e-4)
        with pytest.raises(InvalidInput, match="not a decodable image"):  # the batch split: only it fails
            futures[-1].result(30)
    np.testing.assert_allclose(group, expected["weighted"], atol=1e-4)


def test_reward_client_takes_a_model_or_models(two):
    with pytest.raises(ValueError, match="not both"):
        RewardClient(two.address, model="other", models=WEIGHTS)
    with pytest.raises(ValueError, match="applies to the scores of models"):
        RewardClient(two.address, normalize="running")


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_place_on_servers_names_and_scores_with_its_model(two, expected, other_hf_dir, transport):
    address = two.address if transport == "grpc" else http(two)
    with open_place(servers=[address], model_name="other") as place:
        assert place.model == str(other_hf_dir)
        scores, errors = place.score_all(PROMPT, IMAGES)
    np.testing.assert_allclose(scores, expected["other"], atol=1e-5)
    with open_place(servers=[address], model_name="nope") as place, pytest.raises(NotFound, match="'nope'"):
        _ = place.model


def test_the_cli_scores_with_the_named_model(two, expected, other_hf_dir, tmp_path, capsys):
    files = []
    for k, image in enumerate(IMAGES):
        files.append(tmp_path / f"{k}.jpg")
        files[-1].write_bytes(image)
    argv = ["score", "--server", two.address, "--model-name", "other", "--prompt", PROMPT, "--json"]
    assert main([*argv, *map(str, files)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == str(other_hf_dir)
    np.testing.assert_allclose([r["score"] for r in doc["results"]], expected["other"], atol=1e-5)
    with pytest.raises(SystemExit) as usage:  # a model loaded here is --model itself
        main(["score", "--model", "demo", "--model-name", "other", "--prompt", PROMPT, str(files[0])])
    assert usage.value.code == 2
    assert "--model-name other chooses one of the models a server serves" in capsys.readouterr().err


def test_a_batch_job_scores_with_the_named_model(two, expected, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": [PROMPT] * len(IMAGES), "image": IMAGES}), tmp_path / "rows.parquet")
    argv = ["batch", "--input", str(tmp_path / "rows.parquet"), "--output", str(tmp_path / "out")]
    assert main([*argv, "--server", two.address, "--model-name", "other", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scored"] == len(IMAGES)
    table = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet"))).sort_by("id")
    np.testing.assert_allclose(table["score"].to_numpy(), expected["other"], atol=1e-5)
