"""One protocol for "a place that scores": in this process and on real servers (gRPC and HTTP) on loopback, the same
scores, the same errors naming the same items, for every way in (score_all, a job's shard, from an event loop)."""

from __future__ import annotations

import asyncio
import io
import re
from types import SimpleNamespace

import numpy as np
import pytest

from pickscore.errors import InvalidInput, Unavailable
from pickscore.places import InProcess, OnServers, open_place
from pickscore.server.app import ServerThread
from tests.server.conftest import PROMPT, jpeg, settings_for


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("places")
    paths = []
    for k in range(5):
        paths.append(folder / f"{k}.jpg")
        paths[-1].write_bytes(jpeg(k))
    paths[2].write_bytes(b"not an image at all")
    return paths


@pytest.fixture(scope="module")
def places(tiny_hf_dir):
    with ServerThread(settings_for(tiny_hf_dir)) as server:
        http = f"http://127.0.0.1:{server.server.http_port}"
        opened = {
            "here": open_place(str(tiny_hf_dir), device="cpu", dtype="fp32"),
            "grpc": open_place(servers=[server.address]),
            "http": open_place(servers=[http, server.address]),
        }
        yield opened
        for place in opened.values():
            place.close()


def test_every_place_scores_alike_and_names_the_bad_image(places, images, tiny_hf_dir):
    here, _ = places["here"].score_all(PROMPT, images, skip_invalid=True)
    assert np.isnan(here[2]) and np.isfinite(np.delete(here, 2)).all()
    for where, place in places.items():
        scores, errors = place.score_all(PROMPT, images, skip_invalid=True)
        np.testing.assert_allclose(np.delete(scores, 2), np.delete(here, 2), atol=1e-4, err_msg=where)
        assert list(errors) == [2], where
        said = "" if where == "here" else "server: (INVALID_ARGUMENT|HTTP 400): "  # the server's answer, as it was
        named = rf"^{said}image 2 \({re.escape(str(images[2]))}\): not a decodable image"
        assert re.match(named, str(errors[2])), (where, errors[2])
        with pytest.raises(InvalidInput, match=named):
            place.score_all(PROMPT, images)
    assert places["grpc"].model == str(tiny_hf_dir) == places["here"].model
    assert places["http"].name == f"{tiny_hf_dir} on {places['http'].servers[0]},{places['http'].servers[1]}"


def test_a_shard_of_rows_scores_alike_with_each_row_its_prompt(places, images):
    rows = [SimpleNamespace(prompt=f"{PROMPT} {k % 2}", image=p.read_bytes(), path=None, error="") for k, p in
            enumerate(images)]  # fmt: skip
    rows.append(SimpleNamespace(prompt=PROMPT, image=None, path=str(images[0]) + ".missing", error=""))
    rows.append(SimpleNamespace(prompt=PROMPT, image=None, path=None, error="no image column"))
    results = {where: place.complete(rows, place.prepare(rows)) for where, place in places.items()}
    here_scores, here_errors, _ = results["here"]
    for where, (scores, errors, extra) in results.items():
        np.testing.assert_allclose(scores, here_scores, atol=1e-4, err_msg=where)
        assert sorted(errors) == [2, 5, 6] and errors[6] == "no image column", where
        assert errors[2].startswith("not a decodable image") and errors[5].startswith("cannot read file"), where
        assert extra == {}
    single = places["here"].score_all(f"{PROMPT} 1", [images[1]])[0]
    assert here_scores[1] == pytest.approx(single[0], abs=1e-5)  # each row against its own prompt


def test_embeddings_come_with_in_process_shards_only(tiny_hf_dir, images):
    rows = [SimpleNamespace(prompt=PROMPT, image=p.read_bytes(), path=None, error="") for p in images]
    with open_place(str(tiny_hf_dir), device="cpu", dtype="fp32", embeddings=True) as place:
        assert isinstance(place, InProcess)
        scores, errors, extra = place.complete(rows, place.prepare(rows))
    assert sorted(extra) == ["image_embedding", "text_embedding"]
    image_embeds = extra["image_embedding"]
    assert np.isnan(image_embeds[2]).all() and np.isfinite(np.delete(image_embeds, 2, axis=0)).all()
    np.testing.assert_allclose(np.linalg.norm(extra["text_embedding"][0]), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="--embeddings needs --model"):
        open_place(servers=["127.0.0.1:1"], embeddings=True)


def test_scoring_from_an_event_loop(places, images):
    good = [images[0], images[1]]
    expected = places["here"].score_all(PROMPT, good)[0]

    async def each() -> dict[str, list[float]]:
        return {where: await place.score_async(PROMPT, good) for where, place in places.items()}

    for where, scores in asyncio.run(each()).items():
        np.testing.assert_allclose(scores, expected, atol=1e-4, err_msg=where)


def test_a_server_is_dialled_only_when_used_and_named_when_it_does_not_answer():
    place = open_place(servers=["127.0.0.1:1"], timeout=2)
    assert isinstance(place, OnServers)  # nothing dialled yet: a collection app may start before its scorer
    with pytest.raises(Unavailable, match="127.0.0.1:1"):
        _ = place.model
    with pytest.raises(Unavailable, match="127.0.0.1:2"):
        _ = open_place(servers=["http://127.0.0.1:2"], timeout=2).model
    place.close()


@pytest.mark.parametrize(("model", "servers"), [(None, ()), ("demo", ["127.0.0.1:1"])])
def test_one_place_exactly(model, servers):
    with pytest.raises(ValueError, match="either --model .* or --server"):
        open_place(model, servers)


def test_a_model_name_chooses_among_a_servers_models_only():
    with pytest.raises(ValueError, match="--model-name hps chooses one of the models a server serves"):
        open_place("demo", model_name="hps")
    place = open_place(servers=["127.0.0.1:1"], connection={"token": "t"}, model_name="hps")
    assert isinstance(place, OnServers) and place.model_name == "hps" and place.connection == {"token": "t"}


def test_model_names_are_a_list_each_named_once(capsys):
    from pickscore.cli import main
    from pickscore.places import model_names

    assert model_names("") == [] and model_names("hps") == ["hps"] and model_names("a, b") == ["a", "b"]
    assert model_names(["a", "b"]) == ["a", "b"]
    for bad, reason in (("a,,b", "an empty name"), ("a,b,a", "a is named twice")):
        with pytest.raises(ValueError, match=reason):
            model_names(bad)
    with pytest.raises(ValueError, match="a place scores with one model; several score together in batch"):
        open_place(servers=["127.0.0.1:1"], model_name="a,b")
    with pytest.raises(SystemExit):  # score and rank take one model; batch and evaluate-models several
        main(["score", "--server", "127.0.0.1:1", "--model-name", "a,b", "--prompt", PROMPT, "x.png"])
    assert "--model-name a,b: this command scores with one model" in capsys.readouterr().err


def test_a_joint_kind_scores_in_process_by_its_own_rule_and_has_no_embeddings_to_write(tmp_path):
    from PIL import Image

    from tests.model.image_reward_layout import write_image_reward
    from tests.model.test_image_reward import image_reward_reference_scores

    directory = write_image_reward(tmp_path / "imagereward", seed=3)
    blobs = [jpeg(i, size=100 + 23 * i) for i in range(3)]
    with open_place(str(directory), device="cpu", dtype="fp32") as place:
        scores, errors = place.score_all(PROMPT, blobs)
    pictures = [Image.open(io.BytesIO(b)) for b in blobs]
    np.testing.assert_allclose(scores, image_reward_reference_scores(directory, PROMPT, pictures), atol=1e-4)
    assert not errors
    with pytest.raises(ValueError, match="is image_reward, whose prompt and image meet inside one forward pass"):
        open_place(str(directory), embeddings=True, device="cpu")
