"""Several models in one server, over HTTP and KServe: /v1 (the model in the body or the path), /v1/rewards and
/v1/models, KServe REST by hand, tritonclient.http and tritonclient.grpc on each model and its towers, and the
repository extension (index, load, unload) over both clients, behind the token, refused unless explicit. Every
score against the model's own in-process Scorer; every /v1 answer against the OpenAPI document's schema."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import struct

import jsonschema
import msgpack
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from pickscore import Scorer
from pickscore.model.preprocess import load_pixels
from pickscore.server.app import ServerThread
from tests.server.conftest import PROMPT, jpeg, settings_for
from tests.server.test_http import get, multipart, post

IMAGES = [jpeg(i) for i in range(4)]
MODELS = ("pickscore", "other")
TOKEN = {"authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def scorers(tiny_hf_dir, other_hf_dir) -> dict[str, Scorer]:
    return {
        name: Scorer.from_pretrained(directory, device="cpu", dtype="fp32")
        for name, directory in zip(MODELS, (tiny_hf_dir, other_hf_dir))
    }


@pytest.fixture(scope="module")
def expected(scorers) -> dict[str, np.ndarray]:
    return {name: np.asarray(scorer.score(PROMPT, IMAGES)) for name, scorer in scorers.items()}


@pytest.fixture(scope="module")
def server(tiny_hf_dir, other_hf_dir):
    with ServerThread(settings_for(f"pickscore={tiny_hf_dir},other={other_hf_dir}")) as s:
        yield s


@pytest.fixture(scope="module")
def openapi(server) -> dict:
    return json.loads(get(server, "/openapi.json")[2])


def conforms(openapi: dict, body, schema: str) -> None:
    """``body`` is valid against the OpenAPI document's component ``schema`` (JSON Schema 2020-12), with no field
    the document does not name."""
    components = copy.deepcopy(openapi["components"])
    for spec in components["schemas"].values():
        spec.setdefault("additionalProperties", False)
    root = {"$ref": f"#/components/schemas/{schema}", "components": components}
    jsonschema.validate(body, root, cls=jsonschema.Draft202012Validator)


def as_json(server, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    status, _, answer = post(server, path, json.dumps(body).encode(), "application/json", headers)
    return status, json.loads(answer)


def images_json() -> list[dict]:
    return [{"data": base64.b64encode(b).decode()} for b in IMAGES]


def close(got, want) -> None:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5, rtol=1e-5)


# /v1: the model in the body or the path ----------------------------------------------------------------------


def test_each_model_scores_by_the_body_field_or_the_path(server, expected, openapi):
    for name in MODELS:
        status, body = as_json(server, "/v1/score", {"prompt": PROMPT, "images": images_json(), "model": name})
        assert status == 200, body
        conforms(openapi, body, "ScoreResponse")
        close([r["score"] for r in body["results"]], expected[name])

        packed = msgpack.packb({"prompt": PROMPT, "images": [{"data": b} for b in IMAGES]})
        status, _, answer = post(server, f"/v1/models/{name}/score", packed, "application/msgpack")
        assert status == 200
        close([r["score"] for r in msgpack.unpackb(answer)["results"]], expected[name])

        form, kind = multipart([("prompt", PROMPT), ("model", name)], [(f"{i}.jpg", b) for i, b in enumerate(IMAGES)])
        status, _, answer = post(server, "/v1/score", form, kind)
        assert status == 200, answer
        close([r["score"] for r in json.loads(answer)["results"]], expected[name])

        for path, extra in (("/v1/rank", {"model": name}), (f"/v1/models/{name}/rank", {})):
            status, body = as_json(server, path, {"prompt": PROMPT, "images": images_json(), "topK": 3, **extra})
            assert status == 200, body
            conforms(openapi, body, "RankResponse")
            assert [r["index"] for r in body["ranking"]] == list(np.argsort(-expected[name], kind="stable")[:3])
            close([r["score"] for r in body["ranking"]], expected[name][[r["index"] for r in body["ranking"]]])
    status, body = as_json(server, "/v1/score", {"prompt": PROMPT, "images": images_json()})
    close([r["score"] for r in body["results"]], expected["pickscore"])  # none named: the default


def test_the_path_and_the_body_must_name_the_same_model(server, expected):
    request = {"prompt": PROMPT, "images": images_json(), "model": "pickscore"}
    for path in ("/v1/models/other/score", "/v1/models/other/rank"):
        status, body = as_json(server, path, request)
        assert status == 400 and body["code"] == "INVALID_ARGUMENT"
        assert "'pickscore'" in body["error"] and "'other'" in body["error"], body
    status, body = as_json(server, "/v1/models/other/score", {**request, "model": "other"})
    assert status == 200
    close([r["score"] for r in body["results"]], expected["other"])


def test_an_unknown_model_is_404_naming_it_and_what_is_served(server):
    request = {"prompt": PROMPT, "images": images_json()}
    answers = [
        as_json(server, "/v1/score", {**request, "model": "clip"}),
        as_json(server, "/v1/rank", {**request, "model": "clip"}),
        as_json(server, "/v1/models/clip/score", request),
        as_json(server, "/v1/rewards", {**request, "models": [{"model": "pickscore"}, {"model": "clip"}]}),
    ]
    answers += [(s, json.loads(b)) for s, _, b in (get(server, "/v1/models/clip"), get(server, "/v1/model?model=clip"))]
    for status, body in answers:
        assert status == 404 and body["code"] == "NOT_FOUND", body
        assert "model 'clip' is not served; this server serves pickscore, other" in body["error"], body
    status, body = as_json(server, "/v2/models/clip/infer", {"inputs": []})
    assert status == 404 and "unknown model 'clip'" in body["error"]
    assert "pickscore, pickscore_image, pickscore_text, other, other_image, other_text" in body["error"]


def test_rewards_are_the_weighted_sum_of_each_models_scores(server, expected, openapi):
    weights = {"pickscore": 1.0, "other": -0.5}
    want = sum(w * expected[m] for m, w in weights.items())
    request = {"prompt": PROMPT, "models": [{"model": m, "weight": w} for m, w in weights.items()]}
    status, body = as_json(server, "/v1/rewards", {**request, "images": images_json(), "normalize": "none"})
    assert status == 200, body
    conforms(openapi, body, "RewardsResponse")
    np.testing.assert_allclose(body["rewards"], want, atol=1e-4)
    assert [(p["model"], p["version"], p["weight"]) for p in body["models"]] == [
        (m, "1", w) for m, w in weights.items()
    ]
    for part in body["models"]:
        close(part["scores"], expected[part["model"]])
        assert part["normalized"] == part["scores"]

    packed = msgpack.packb({**request, "images": [{"data": b} for b in IMAGES], "normalize": "NORMALIZE_NONE"})
    status, _, answer = post(server, "/v1/rewards", packed, "application/msgpack")
    assert status == 200
    np.testing.assert_allclose(msgpack.unpackb(answer)["rewards"], want, atol=1e-4)

    status, body = as_json(server, "/v1/rewards", {"prompt": PROMPT, "images": images_json()})
    assert [p["model"] for p in body["models"]] == ["pickscore"]  # none named: the default, weight 1
    close(body["rewards"], expected["pickscore"])


def test_rewards_refuse_a_declared_normalisation_no_model_declares(server):
    for normalize in ("declared", "NORMALIZE_DECLARED"):
        request = {"prompt": PROMPT, "images": images_json(), "models": [{"model": "other"}], "normalize": normalize}
        status, body = as_json(server, "/v1/rewards", request)
        assert status == 400 and body["code"] == "INVALID_ARGUMENT"
        assert "model 'other' declares no normalisation" in body["error"], body
    status, body = as_json(server, "/v1/rewards", {"prompt": PROMPT, "images": images_json(), "normalize": "mean"})
    assert status == 400 and "normalize 'mean': one of none, declared, running" in body["error"]


def test_models_are_listed_and_described(server, openapi):
    status, _, answer = get(server, "/v1/models")
    listed = json.loads(answer)
    assert status == 200
    conforms(openapi, listed, "ListModelsResponse")
    assert [m["model"] for m in listed["models"]] == list(MODELS)  # the default first
    assert all(m["weights_bytes"] > 0 and m["model_version"] == "1" for m in listed["models"])
    other = json.loads(get(server, "/v1/models/other")[2])
    assert (other["model"], other["embed_dim"]) == ("other", 24) and other["weights_bytes"] > 0
    assert json.loads(get(server, "/v1/model?model=other")[2])["weights_bytes"] == other["weights_bytes"]
    assert json.loads(get(server, "/v1/model")[2])["model"] == "pickscore"
    conforms(openapi, other, "GetModelInfoResponse")


# KServe v2: REST by hand, tritonclient.http and tritonclient.grpc -----------------------------------------------


def bytes_tensor(values: list[bytes]) -> bytes:
    """Triton's binary BYTES: each element's length (4 bytes, little-endian), then its bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def test_kserve_rest_infer_on_each_model_and_its_towers(server, expected, scorers):
    for name in MODELS:
        blob = bytes_tensor(IMAGES)
        header = json.dumps(
            {
                "inputs": [
                    {"name": "PROMPT", "datatype": "BYTES", "shape": [1, 1], "data": [PROMPT]},
                    {
                        "name": "IMAGE",
                        "datatype": "BYTES",
                        "shape": [len(IMAGES), 1],
                        "parameters": {"binary_data_size": len(blob)},
                    },
                ],
                "outputs": [{"name": "SCORE", "parameters": {"binary_data": False}}],
            }
        ).encode()
        lengths = {"Inference-Header-Content-Length": str(len(header))}
        status, _, answer = post(server, f"/v2/models/{name}/infer", header + blob, "application/octet-stream", lengths)
        assert status == 200, answer
        body = json.loads(answer)
        assert (body["model_name"], body["model_version"]) == (name, "1")
        close(body["outputs"][0]["data"], expected[name])

    scorer = scorers["other"]
    pixels = np.stack([load_pixels(b, scorer.preprocess_config) for b in IMAGES[:2]])
    tokens = scorer.tokenizer([PROMPT, "a cat"])
    for model, name, tensor, datatype, output, want in (
        ("other_image", "pixel_values", pixels, "FP32", "image_embeds", scorer.encode_pixels(pixels)),
        ("other_text", "input_ids", tokens, "INT64", "text_embeds", scorer.encode_text([PROMPT, "a cat"])),
    ):
        spec = {"name": name, "datatype": datatype, "shape": list(tensor.shape), "data": tensor.reshape(-1).tolist()}
        status, body = as_json(server, f"/v2/models/{model}/infer", {"inputs": [spec]})
        assert status == 200, body
        (out,) = body["outputs"]
        assert out["name"] == output and out["shape"] == [len(tensor), 24]  # other's embedding width
        close(np.reshape(out["data"], out["shape"]), want)


def ensemble_inputs(module) -> list:
    prompt = module.InferInput("PROMPT", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
    image = module.InferInput("IMAGE", [len(IMAGES), 1], "BYTES")
    image.set_data_from_numpy(np.array([[b] for b in IMAGES], dtype=object))
    return [prompt, image]


def test_tritonclient_http_and_grpc_infer_on_each_model(server, expected):
    with (
        triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}") as http,
        triton_grpc.InferenceServerClient(server.address) as grpc_client,
    ):
        for module, client in ((triton_http, http), (triton_grpc, grpc_client)):
            for name in MODELS:
                result = client.infer(name, ensemble_inputs(module))
                close(result.as_numpy("SCORE")[:, 0], expected[name])
                for model in (name, f"{name}_image", f"{name}_text"):
                    assert client.is_model_ready(model) and client.is_model_ready(model, "1")
        assert http.get_model_metadata("other")["versions"] == ["1"]
        assert grpc_client.get_model_metadata("other_text").versions == ["1"]
        assert http.get_model_metadata("other_image")["outputs"][0]["shape"] == [-1, 24]
        with pytest.raises(InferenceServerException, match="no version '2'"):
            http.get_model_metadata("other", "2")
    status, _, body = get(server, "/v2/models/other/ready")
    assert status == 200 and json.loads(body) == {"name": "other", "ready": True}


# the repository extension -------------------------------------------------------------------------------------


def test_model_control_is_refused_unless_explicit(server):
    for action in ("load", "unload"):
        status, body = as_json(server, f"/v2/repository/models/other/{action}", {})
        assert status == 403 and body["code"] == "PERMISSION_DENIED", body
        assert "--model-control-mode explicit" in body["error"]
    with triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}") as http:
        for call in (http.load_model, http.unload_model):
            with pytest.raises(InferenceServerException, match="--model-control-mode explicit"):
                call("other")
        assert {(m["name"], m["state"]) for m in http.get_model_repository_index()} == {
            ("pickscore", "READY"),
            ("other", "READY"),
        }
    with triton_grpc.InferenceServerClient(server.address) as client:
        with pytest.raises(InferenceServerException) as error:
            client.load_model("other")
        assert error.value.status() == "StatusCode.PERMISSION_DENIED"
        assert [m.name for m in client.get_model_repository_index().models] == ["other", "pickscore"]
    assert json.loads(get(server, "/v1/models/other")[2])["model"] == "other"  # still served


def test_tritonclient_grpc_unload_is_refused_for_the_mode(server):
    with triton_grpc.InferenceServerClient(server.address) as client:
        with pytest.raises(InferenceServerException) as error:
            client.unload_model("other")
        assert error.value.status() == "StatusCode.PERMISSION_DENIED", error.value.message()


@pytest.fixture(scope="module")
def explicit(tmp_path_factory, tiny_hf_dir, other_hf_dir):
    """A repository (pickscore/1, other/1) served with --model-control-mode explicit, behind a token."""
    root = tmp_path_factory.mktemp("repository")
    for name, source in zip(MODELS, (tiny_hf_dir, other_hf_dir)):
        shutil.copytree(source, root / name / "1")
    settings = settings_for("unused", model_repository=str(root), model_control_mode="explicit", auth_token="s3cret")
    with ServerThread(settings) as s:
        yield s


def states(rows) -> dict[str, str]:
    return {m["name"]: m["state"] for m in rows}


def test_tritonclient_http_unloads_and_loads_a_model(explicit, expected):
    with triton_http.InferenceServerClient(f"127.0.0.1:{explicit.server.http_port}") as http:
        assert states(http.get_model_repository_index(headers=TOKEN)) == {"pickscore": "READY", "other": "READY"}
        http.unload_model("other", headers=TOKEN)
        with pytest.raises(InferenceServerException, match="unknown model 'other'"):
            http.infer("other", ensemble_inputs(triton_http), headers=TOKEN)
        index = http.get_model_repository_index(headers=TOKEN)
        assert {"name": "other", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in index
        close(
            http.infer("pickscore", ensemble_inputs(triton_http), headers=TOKEN).as_numpy("SCORE")[:, 0],
            expected["pickscore"],
        )
        http.load_model("other", headers=TOKEN)
        assert states(http.get_model_repository_index(headers=TOKEN))["other"] == "READY"
        close(
            http.infer("other", ensemble_inputs(triton_http), headers=TOKEN).as_numpy("SCORE")[:, 0], expected["other"]
        )
        assert http.is_model_ready("other_image", headers=TOKEN)


def test_tritonclient_grpc_unloads_and_loads_a_model(explicit, expected):
    token = {"authorization": TOKEN["authorization"]}
    with triton_grpc.InferenceServerClient(explicit.address) as client:
        index = client.get_model_repository_index(headers=token, as_json=True)["models"]
        assert states(index) == {"pickscore": "READY", "other": "READY"}
        client.unload_model("other", headers=token)
        with pytest.raises(InferenceServerException) as error:
            client.infer("other", ensemble_inputs(triton_grpc), headers=token)
        assert error.value.status() == "StatusCode.NOT_FOUND" and "unknown model 'other'" in error.value.message()
        assert (
            states(client.get_model_repository_index(headers=token, as_json=True)["models"])["other"] == "UNAVAILABLE"
        )
        client.load_model("other", headers=token)
        assert states(client.get_model_repository_index(headers=token, as_json=True)["models"])["other"] == "READY"
        close(
            client.infer("other", ensemble_inputs(triton_grpc), headers=token).as_numpy("SCORE")[:, 0],
            expected["other"],
        )


def test_the_repository_calls_need_the_token(explicit):
    for path in ("/v2/repository/index", "/v2/repository/models/other/load", "/v2/repository/models/other/unload"):
        status, body = as_json(explicit, path, {})
        assert status == 401 and body["code"] == "UNAUTHENTICATED", (path, body)
    with triton_http.InferenceServerClient(f"127.0.0.1:{explicit.server.http_port}") as http:
        for call in (http.get_model_repository_index, lambda: http.unload_model("other")):
            with pytest.raises(InferenceServerException, match="missing credentials"):
                call()
    with triton_grpc.InferenceServerClient(explicit.address) as client:
        for call in (
            client.get_model_repository_index,
            lambda: client.load_model("other"),
            lambda: client.unload_model("other"),
        ):
            with pytest.raises(InferenceServerException) as error:
                call()
            assert error.value.status() == "StatusCode.UNAUTHENTICATED"
    with triton_http.InferenceServerClient(f"127.0.0.1:{explicit.server.http_port}") as http:
        assert states(http.get_model_repository_index(headers=TOKEN))["other"] == "READY"  # nothing changed


def test_the_document_is_served_while_the_default_model_is_unloaded(explicit, expected):
    with triton_http.InferenceServerClient(f"127.0.0.1:{explicit.server.http_port}") as http:
        http.unload_model("pickscore", headers=TOKEN)
        try:
            status, _, body = get(explicit, "/openapi.json")
            assert status == 200, body
            assert "other" in json.loads(body)["info"]["description"]
            status, _, body = post(explicit, "/v1/score", b'{"prompt": "x"}', "application/json", TOKEN)
            assert status == 404
            assert "the default model 'pickscore' is not served; this server serves other" in json.loads(body)["error"]
        finally:
            http.load_model("pickscore", headers=TOKEN)
        close(
            http.infer("pickscore", ensemble_inputs(triton_http), headers=TOKEN).as_numpy("SCORE")[:, 0],
            expected["pickscore"],
        )
