"""The HTTP front door against a real server on loopback: tritonclient.http (sync and aio) against the gRPC
answers, /v1/score and /v1/rank in JSON, multipart and msgpack as curl would send them, every error row's
status, cross-transport batching, and the OpenAPI document."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import re
import resource
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from pickscore.backends.torch_backend import TorchBackend
from pickscore.client import Client
from pickscore.errors import InvalidInput
from pickscore.model.checkpoint import resolve
from pickscore.model.preprocess import load_pixels
from pickscore.server.app import ServerThread
from tests.server.conftest import PROMPT, jpeg, metric, settings_for
from tests.server.test_overload import RED, SlowBackend, solid

IMAGES = [jpeg(i) for i in range(5)]


def url(server: ServerThread, path: str) -> str:
    return f"http://127.0.0.1:{server.server.http_port}{path}"


def post(server, path: str, body: bytes, content_type: str, headers: dict | None = None):
    """(status, headers, body) of a raw HTTP POST, as curl would send it."""
    request = urllib.request.Request(
        url(server, path), data=body, headers={"Content-Type": content_type, **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def get(server, path: str):
    try:
        with urllib.request.urlopen(url(server, path), timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def multipart(fields: list[tuple[str, str]], files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = b""
    for name, value in fields:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for filename, data in files:
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def expected(server):
    with Client(server.address) as client:
        return np.array(client.score(PROMPT, IMAGES))


@pytest.fixture
def http(server):
    with triton_http.InferenceServerClient(f"127.0.0.1:{server.server.http_port}") as client:
        yield client


@pytest.fixture
def grpc_tc(server):
    with triton_grpc.InferenceServerClient(server.address) as client:
        yield client


def ensemble_inputs(module, binary: bool) -> list:
    prompt = module.InferInput("PROMPT", [1, 1], "BYTES")
    value = np.array([[PROMPT.encode()]], dtype=object)
    if module is triton_grpc:
        prompt.set_data_from_numpy(value)
    else:
        prompt.set_data_from_numpy(value, binary_data=binary)
    image = module.InferInput("IMAGE", [len(IMAGES), 1], "BYTES")
    image.set_data_from_numpy(np.array([[b] for b in IMAGES], dtype=object))  # JPEG bytes: binary always
    return [prompt, image]


@pytest.mark.parametrize("binary_output", [True, False])
@pytest.mark.parametrize("binary_prompt", [True, False])
def test_tritonclient_http_infer_equals_grpc(http, grpc_tc, expected, binary_prompt, binary_output):
    outputs = [triton_http.InferRequestedOutput("SCORE", binary_data=binary_output)]
    result = http.infer("pickscore", ensemble_inputs(triton_http, binary_prompt), outputs=outputs)
    over_grpc = grpc_tc.infer("pickscore", ensemble_inputs(triton_grpc, True)).as_numpy("SCORE")
    np.testing.assert_allclose(result.as_numpy("SCORE"), over_grpc, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("SCORE")[:, 0], expected, atol=1e-6)


def test_json_tensors_on_the_tower_models(http, grpc_tc, tiny_hf_dir):
    from pickscore.scorer import Scorer

    scorer = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")
    tokens = scorer.tokenizer([PROMPT, "a cat"])
    answers = []
    for module, client in ((triton_http, http), (triton_grpc, grpc_tc)):
        inp = module.InferInput("input_ids", list(tokens.shape), "INT64")
        if module is triton_http:
            inp.set_data_from_numpy(tokens, binary_data=False)  # JSON numbers
        else:
            inp.set_data_from_numpy(tokens)
        answers.append(client.infer("pickscore_text", [inp]).as_numpy("text_embeds"))
    np.testing.assert_allclose(answers[0], answers[1], atol=1e-6)
    pixels = load_pixels(IMAGES[0], scorer.preprocess_config)[None]
    inp = triton_http.InferInput("pixel_values", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels, binary_data=False)
    out = http.infer("pickscore_image", [inp], outputs=[triton_http.InferRequestedOutput("image_embeds", False)])
    np.testing.assert_allclose(out.as_numpy("image_embeds"), scorer.encode_pixels(pixels), atol=1e-5)


def test_tritonclient_http_aio(server, expected):
    async def run():
        async with triton_http_aio.InferenceServerClient(f"127.0.0.1:{server.server.http_port}") as client:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready("pickscore")
            return await client.infer("pickscore", ensemble_inputs(triton_http_aio, True))

    np.testing.assert_allclose(asyncio.run(run()).as_numpy("SCORE")[:, 0], expected, atol=1e-6)


def _plain(message) -> dict:
    """A gRPC answer in the HTTP API's JSON form: declared field names, every field, 64-bit ints as numbers."""
    from pickscore.server.api_kserve import triton_json

    return triton_json(message)


def test_metadata_config_readiness_and_statistics_equal_grpc(http, grpc_tc):
    for name in ("pickscore", "pickscore_image", "pickscore_text"):
        metadata = http.get_model_metadata(name)  # and the identity, which gRPC carries in the config's parameters
        identity = metadata.pop("identity")
        assert grpc_tc.get_model_config(name).config.parameters["identity"].string_value == identity
        assert metadata == _plain(grpc_tc.get_model_metadata(name))
        assert http.get_model_metadata(name, "1") == http.get_model_metadata(name)
        assert http.get_model_config(name) == _plain(grpc_tc.get_model_config(name).config)
        assert http.is_model_ready(name) and http.is_model_ready(name, "1")
    assert http.get_server_metadata() == _plain(grpc_tc.get_server_metadata())
    assert http.get_inference_statistics("pickscore") == _plain(grpc_tc.get_inference_statistics("pickscore"))
    assert http.get_inference_statistics() == _plain(grpc_tc.get_inference_statistics())
    assert http.get_model_config("pickscore")["input"][0]["dims"] == [1]  # numbers, as Triton writes them
    assert not http.is_model_ready("nope")
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        http.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="has no version '7'"):
        http.get_model_config("pickscore", "7")


def test_v1_score_in_json_multipart_and_msgpack_equals_scoring_v1(server, expected):
    images = [{"data": base64.b64encode(b).decode(), "id": f"c{i}"} for i, b in enumerate(IMAGES)]
    status, headers, body = post(
        server, "/v1/score", json.dumps({"prompt": PROMPT, "images": images}).encode(), "application/json"
    )
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    results = json.loads(body)["results"]
    assert [r["index"] for r in results] == list(range(5)) and [r["id"] for r in results] == [f"c{i}" for i in range(5)]
    np.testing.assert_allclose([r["score"] for r in results], expected, atol=1e-6)

    form, kind = multipart([("prompt", PROMPT)], [(f"f{i}.jpg", b) for i, b in enumerate(IMAGES)])
    status, _, body = post(server, "/v1/score", form, kind)
    assert status == 200
    results = json.loads(body)["results"]
    np.testing.assert_allclose([r["score"] for r in results], expected, atol=1e-6)
    assert results[2]["id"] == "f2.jpg"

    packed = msgpack.packb({"prompt": PROMPT, "images": [{"data": b} for b in IMAGES]})
    status, headers, body = post(server, "/v1/score", packed, "application/msgpack")
    assert status == 200 and headers["Content-Type"].startswith("application/msgpack")
    np.testing.assert_allclose([r["score"] for r in msgpack.unpackb(body)["results"]], expected, atol=1e-6)

    pairs = {"prompts": [PROMPT, "a cat"], "images": [{"data": b} for b in IMAGES[:2]]}
    status, _, body = post(server, "/v1/score", msgpack.packb(pairs), "application/msgpack")
    with Client(server.address) as client:
        np.testing.assert_allclose(
            [r["score"] for r in msgpack.unpackb(body)["results"]],
            client.score_pairs([PROMPT, "a cat"], IMAGES[:2]),
            atol=1e-6,
        )


def test_v1_rank_and_model(server, expected):
    images = [{"data": base64.b64encode(b).decode()} for b in IMAGES]
    status, _, body = post(
        server, "/v1/rank", json.dumps({"prompt": PROMPT, "images": images, "top_k": 2}).encode(), "application/json"
    )
    ranking = json.loads(body)["ranking"]
    assert status == 200 and len(ranking) == 2
    assert [r["index"] for r in ranking] == list(np.argsort(-expected, kind="stable")[:2])
    form, kind = multipart([("prompt", PROMPT), ("top_k", "1")], [("a.jpg", IMAGES[0]), ("b.jpg", IMAGES[1])])
    status, _, body = post(server, "/v1/rank", form, kind)
    assert status == 200 and len(json.loads(body)["ranking"]) == 1
    status, _, body = get(server, "/v1/model")
    assert status == 200 and json.loads(body)["max_images_per_request"] == 256


@pytest.mark.parametrize(
    "body, kind, status, message",
    [
        (
            json.dumps({"prompt": PROMPT, "images": [{"data": base64.b64encode(b"junk").decode(), "id": "x"}]}),
            "application/json",
            400,
            "image 0 (id 'x'): not a decodable image",
        ),
        (json.dumps({"prompt": PROMPT}), "application/json", 400, "no images given"),
        ("{not json", "application/json", 400, "request body: not JSON"),
        (json.dumps({"prompt": PROMPT, "imagez": []}), "application/json", 400, "imagez"),
        (msgpack.packb({"prompt": PROMPT, "images": [{"data": 5}]}), "application/msgpack", 400, "field 'data'"),
        (b"\xc1\xc1", "application/msgpack", 400, "not msgpack"),
    ],
)
def test_v1_errors_name_the_item(server, body, kind, status, message):
    got, _, answer = post(server, "/v1/score", body if isinstance(body, bytes) else body.encode(), kind)
    decoded = msgpack.unpackb(answer) if kind == "application/msgpack" else json.loads(answer)
    assert got == status and message in decoded["error"], decoded
    assert decoded["code"] == "INVALID_ARGUMENT"


def test_unknown_route_and_model_are_404(server):
    assert get(server, "/v2/models/nope")[0] == 404
    status, _, body = post(server, "/v2/models/nope/infer", b'{"inputs": []}', "application/json")
    assert status == 404 and "unknown model 'nope'" in json.loads(body)["error"]
    assert get(server, "/no/such/path")[0] == 404


def test_unauthenticated_is_401(tiny_hf_dir):
    with ServerThread(settings_for(tiny_hf_dir, auth_token="s3cret")) as server:
        body = json.dumps({"prompt": PROMPT, "images": [{"data": base64.b64encode(IMAGES[0]).decode()}]}).encode()
        status, headers, answer = post(server, "/v1/score", body, "application/json")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert "missing credentials" in json.loads(answer)["error"]
        ok = post(server, "/v1/score", body, "application/json", {"authorization": "Bearer s3cret"})
        assert ok[0] == 200
        assert get(server, "/v2/health/ready")[0] == 200  # health stays open


def test_overload_is_429_with_retry_after_and_deadline_is_504(tiny_hf_dir):
    backend = SlowBackend(str(tiny_hf_dir), per_item=0.05)
    settings = settings_for(tiny_hf_dir, max_queue_wait_s=0.1)
    pool = ThreadPoolExecutor(2)
    try:
        with ServerThread(settings, backend=backend) as server, Client(server.address) as client:
            parked = pool.submit(client.score, PROMPT, [solid(RED)])
            assert backend.parked.wait(30)
            queued = pool.submit(client.score, PROMPT, [jpeg(i) for i in range(6)])
            time.sleep(0.5)
            one = json.dumps({"prompt": PROMPT, "images": [{"data": base64.b64encode(IMAGES[0]).decode()}]}).encode()
            status, headers, answer = post(server, "/v1/score", one, "application/json")
            assert status == 429, answer
            assert int(headers["Retry-After"]) >= 1 and int(headers["retry-after-ms"]) > 0
            assert json.loads(answer)["code"] == "RESOURCE_EXHAUSTED"
            backend.release.set()
            assert len(parked.result(30)) == 1 and len(queued.result(30)) == 6
            assert metric(server, "pickscore_requests_total", transport="http", code="RESOURCE_EXHAUSTED") == 1
    finally:
        backend.release.set()
        pool.shutdown()

    backend = SlowBackend(str(tiny_hf_dir))
    try:
        with ServerThread(settings_for(tiny_hf_dir), backend=backend) as server, Client(server.address) as client:
            parked = ThreadPoolExecutor(1).submit(client.score, PROMPT, [solid(RED)])
            assert backend.parked.wait(30)
            one = json.dumps({"prompt": PROMPT, "images": [{"data": base64.b64encode(IMAGES[1]).decode()}]}).encode()
            status, _, answer = post(server, "/v1/score", one, "application/json", {"timeout": "0.5"})
            assert status == 504 and json.loads(answer)["code"] == "DEADLINE_EXCEEDED"
            status, _, answer = post(server, "/v1/score", one, "application/json", {"timeout": "soon"})
            assert status == 400 and "timeout 'soon'" in json.loads(answer)["error"]
            backend.release.set()
            parked.result(30)
    finally:
        backend.release.set()


class WarmingBackend(TorchBackend):
    """Warm-up waits for ``go``: the server is bound but not ready."""

    def __init__(self, ref: str):
        super().__init__(resolve(ref))
        self.go = threading.Event()

    def warm(self, *sizes) -> None:
        self.go.wait(30)
        super().warm(*sizes)


def test_warming_up_is_503_and_request_ids_are_echoed(tiny_hf_dir):
    backend = WarmingBackend(str(tiny_hf_dir))
    server = ServerThread(settings_for(tiny_hf_dir), backend=backend)
    starting = threading.Thread(target=server.__enter__)
    starting.start()
    try:
        deadline = time.monotonic() + 30
        while server.server.http_port is None and time.monotonic() < deadline:
            time.sleep(0.05)
        live, ready = get(server, "/v2/health/live"), get(server, "/v2/health/ready")
        assert (live[0], json.loads(live[2])) == (200, {"live": True})
        assert (ready[0], json.loads(ready[2])) == (503, {"ready": False})
        body = json.dumps({"prompt": PROMPT, "images": [{"data": base64.b64encode(IMAGES[0]).decode()}]}).encode()
        status, headers, answer = post(server, "/v1/score", body, "application/json", {"x-request-id": "req-42"})
        assert status == 503 and headers["Retry-After"] and "warming up" in json.loads(answer)["error"]
        assert headers["x-request-id"] == "req-42"
    finally:
        backend.go.set()
        starting.join(60)
        server.stop()


def test_http_and_grpc_requests_share_a_batch(tiny_hf_dir):
    settings = settings_for(tiny_hf_dir, max_queue_delay_ms=1500, max_batch_size=8)
    with ServerThread(settings) as server, Client(server.address) as client:
        batches = metric(server, "pickscore_batch_size_count", tower="image")
        images = metric(server, "pickscore_batch_size_sum", tower="image")
        body = json.dumps({"prompt": "a dog", "images": [{"data": base64.b64encode(IMAGES[0]).decode()}]}).encode()
        with ThreadPoolExecutor(2) as pool:
            over_grpc = pool.submit(client.score, PROMPT, [IMAGES[1]])
            over_http = pool.submit(post, server, "/v1/score", body, "application/json")
            assert len(over_grpc.result(30)) == 1 and over_http.result(30)[0] == 200
        assert metric(server, "pickscore_batch_size_count", tower="image") == batches + 1  # one forward pass
        assert metric(server, "pickscore_batch_size_sum", tower="image") == images + 2  # holding both
        assert metric(server, "pickscore_requests_total", transport="http", rpc="Score", code="OK") == 1
        assert metric(server, "pickscore_requests_total", transport="grpc", rpc="Score", code="OK") == 1


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v2/health/live", {"live": True}),
        ("/v2/health/ready", {"ready": True}),
        ("/v2/models/pickscore/ready", {"name": "pickscore", "ready": True}),
        ("/v2/models/pickscore_image/versions/1/ready", {"name": "pickscore_image", "ready": True}),
    ],
)
def test_health_answers_are_kserve_v2_json(server, http, path, body):
    """The protocol's bodies (the kserve SDK parses them; an empty body made it raise JSONDecodeError), while
    tritonclient.http, which reads only the status, still works."""
    status, headers, answer = get(server, path)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(answer) == body
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready(body.get("name", "pickscore"))


def test_openapi_documents_every_route(server):
    status, _, body = get(server, "/openapi.json")
    doc = json.loads(body)
    assert status == 200 and doc["openapi"].startswith("3.")
    served = {r.resource.canonical for r in server.server.http.app.router.routes()}
    assert served == set(doc["paths"]), served ^ set(doc["paths"])
    for path, methods in doc["paths"].items():
        for method in methods:
            assert any(
                r.resource.canonical == path and r.method == method.upper()
                for r in server.server.http.app.router.routes()
            ), (path, method)
        for method, operation in methods.items():  # each {param} of the path is a declared path parameter
            declared = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), (path, method, declared)
    pool = json_format.descriptor_pool.Default()
    for message in ("ScoreRequest", "RankRequest", "RewardsRequest", "RewardsResponse", "ListModelsResponse"):
        properties = doc["components"]["schemas"][message]["properties"]
        assert set(properties) == {f.name for f in pool.FindMessageTypeByName(f"pickscore.v1.{message}").fields}
    normalize = doc["components"]["schemas"]["RewardsRequest"]["properties"]["normalize"]
    assert {"none", "declared", "running", "NORMALIZE_RUNNING"} <= set(normalize["enum"])


def test_a_failed_batch_is_500(tiny_hf_dir):
    from tests.server.test_errors import FlakyBackend

    with ServerThread(settings_for(tiny_hf_dir), backend=FlakyBackend(str(tiny_hf_dir))) as server:
        body = msgpack.packb({"prompt": PROMPT, "images": [{"data": solid((255, 0, 255))}]})
        status, _, answer = post(server, "/v1/score", body, "application/msgpack")
        assert status == 500 and msgpack.unpackb(answer)["code"] == "INTERNAL"
        assert "image tower failed on a batch of 1" in msgpack.unpackb(answer)["error"]
        ok = post(
            server,
            "/v1/score",
            msgpack.packb({"prompt": PROMPT, "images": [{"data": IMAGES[0]}]}),
            "application/msgpack",
        )
        assert ok[0] == 200  # only that batch failed


def test_a_body_over_the_message_limit_is_413_naming_the_limit(tiny_hf_dir):
    with ServerThread(settings_for(tiny_hf_dir, max_message_bytes=4096)) as server:
        big = json.dumps({"prompt": PROMPT, "images": [{"data": base64.b64encode(IMAGES[0] * 2).decode()}]})
        status, _, answer = post(server, "/v1/score", big.encode(), "application/json")
        assert status == 413 and "request body over 4096 bytes (--max-message-bytes)" in json.loads(answer)["error"]
        form, kind = multipart([("prompt", PROMPT)], [("a.jpg", IMAGES[0] * 2)])
        status, _, answer = post(server, "/v1/rank", form, kind)
        assert status == 413 and "request body over 4096 bytes" in json.loads(answer)["error"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_bodies_are_decoded_and_bounded_after_decompression(http, expected, tiny_hf_dir, algorithm):
    """tritonclient's request_compression_algorithm (Content-Encoding gzip or deflate) and a compressed /v1 body score
    as the plain ones; --max-message-bytes bounds the decompressed size, so a compression bomb is refused while
    it is read, never held whole."""
    compress = gzip.compress if algorithm == "gzip" else zlib.compress
    result = http.infer("pickscore", ensemble_inputs(triton_http, True), request_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("SCORE")[:, 0], expected, atol=1e-6)
    with ServerThread(settings_for(tiny_hf_dir, max_message_bytes=1 << 20)) as server:
        body = json.dumps({"prompt": PROMPT, "images": [{"data": base64.b64encode(i).decode()} for i in IMAGES]})
        status, _, answer = post(
            server, "/v1/score", compress(body.encode()), "application/json", {"Content-Encoding": algorithm}
        )
        assert status == 200
        np.testing.assert_allclose([r["score"] for r in json.loads(answer)["results"]], expected, atol=1e-5)
        bomb = _bomb(algorithm, 512)  # 512 MB of spaces in about 0.5 MB, never held whole here either
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server runs in this process
        status, _, answer = post(server, "/v1/score", bomb, "application/json", {"Content-Encoding": algorithm})
        assert status == 413 and "request body over 1048576 bytes (--max-message-bytes)" in json.loads(answer)["error"]
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
        assert grown < 64 << 10, f"peak RSS grew {grown >> 10} MiB reading a 512 MiB bomb"  # read and refused in 1 MiB


def _bomb(algorithm: str, megabytes: int) -> bytes:
    """A JSON body of ``megabytes`` MB of spaces, gzip or deflate compressed a megabyte at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31 if algorithm == "gzip" else 15)
    spaces = b" " * (1 << 20)
    parts = [packer.compress(b'{"prompt": "')] + [packer.compress(spaces) for _ in range(megabytes)]
    return b"".join([*parts, packer.compress(b'"}'), packer.flush()])


# The HTTP codecs without a server: JSON, msgpack and binary tensors straight to the api's values and back ------


def test_kserve_rest_json_and_binary_inputs_decode_straight_to_numpy():
    from pickscore.server.api_kserve import InferResponse, Tensor
    from pickscore.server.http_kserve import infer_request, infer_response

    tokens = np.arange(6, dtype="<i8").reshape(2, 3)
    header = json.dumps(
        {
            "id": "r-1",
            "parameters": {"priority": 1, "binary_data_output": True},
            "inputs": [
                {"name": "PROMPT", "datatype": "BYTES", "shape": [2, 1], "data": [["a cat"], ["ü"]]},
                {"name": "ids", "datatype": "INT64", "shape": [2, 3], "parameters": {"binary_data_size": 48}},
                {"name": "x", "datatype": "FP16", "shape": [1, 2], "data": [0.5, 1.5]},
            ],
            "outputs": [{"name": "SCORE", "parameters": {"binary_data": False}}],
        }
    ).encode()
    request, binary = infer_request(header + tokens.tobytes(), str(len(header)), "pickscore", "1")
    assert (request.model, request.version, request.id, list(request.outputs)) == ("pickscore", "1", "r-1", ["SCORE"])
    assert dict(request.parameters) == {"priority": 1} and binary == {"SCORE": False, "*": True}
    prompt, ids, x = (tensor.read() for tensor in request.inputs)
    assert prompt.tolist() == [[b"a cat"], ["ü".encode()]]
    assert ids.tolist() == tokens.tolist() and x.dtype == np.float16 and x.tolist() == [[0.5, 1.5]]
    with pytest.raises(InvalidInput, match="4 bytes after the last binary input"):
        infer_request(header + tokens.tobytes() + b"more", str(len(header)), "pickscore", "")
    with pytest.raises(InvalidInput, match=r"input 'x': 3 values for shape \[1, 2\] \(2 expected\)"):
        spec = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2, 3]}
        infer_request(json.dumps({"inputs": [spec]}).encode(), None, "m", "")[0].inputs[0].read()

    scores = np.array([[0.25], [1.5]], np.float32)
    response = InferResponse("pickscore", "1", "r-1", [Tensor("SCORE", "FP32", scores)])
    body, length = infer_response(response, {"*": False})
    assert length is None and json.loads(body)["outputs"][0]["data"] == [0.25, 1.5]
    body, length = infer_response(response, {"*": True})
    assert json.loads(body[:length])["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(body[length:], "<f4").tolist() == [0.25, 1.5]


def test_v1_fields_from_json_and_msgpack():
    from pickscore.server.api import RankedImage
    from pickscore.server.http import RANK, SCORE, _fields, _record

    jpeg = b"\xff\xd8\xff\xfe?"  # base64 with both URL-safe and standard alphabets' characters
    text = base64.urlsafe_b64encode(jpeg).decode().rstrip("=")
    fields = _fields({"prompt": "a cat", "topK": "2", "images": [{"data": text, "id": None}]}, RANK, binary=False)
    assert fields == {"prompt": "a cat", "top_k": 2, "images": [{"data": jpeg}]}
    standard = base64.b64encode(jpeg).decode()
    assert _fields({"images": [{"data": standard}]}, SCORE, binary=False)["images"][0]["data"] == jpeg
    pixels = {"height": 1, "width": 1, "channels": 3, "data": b"\0\0\0"}
    assert _fields({"images": [{"pixels": pixels}]}, SCORE, binary=True)["images"][0]["pixels"] == pixels
    for obj, message, binary, error in (
        ({"imagez": []}, SCORE, False, "field 'imagez': ScoreRequest has no such field"),
        ({"top_k": 1}, SCORE, False, "field 'top_k': ScoreRequest has no such field"),
        ({"topK": 1}, RANK, True, "field 'topK': RankRequest has no such field"),
        ({"images": [{"data": 5}]}, SCORE, True, "field 'data': bytes expected, got 5"),
        ({"images": {"data": b""}}, SCORE, True, "field 'images': a list expected, got dict"),
        ({"images": ["x"]}, SCORE, True, "Image: a map expected, got str"),
        ({"top_k": -1}, RANK, True, "field 'top_k': an unsigned 32-bit integer expected, got -1"),
        ({"top_k": 1.5}, RANK, False, "field 'top_k': an unsigned 32-bit integer expected, got 1.5"),
    ):
        with pytest.raises(InvalidInput, match=error):
            _fields(obj, message, binary)
    assert _record(RankedImage(0, "a", 0.1, 1.0)) == {"index": 0, "id": "a", "score": 0.1, "probability": 1.0}
