"""KServe v2 (Triton's protocol) on the same server, driven by tritonclient: sync, async callback, stream, aio."""

from __future__ import annotations

import asyncio
import queue
import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from pickscore.backends.triton_config import model_configs
from pickscore.client import Client
from pickscore.model.preprocess import load_pixels
from pickscore.scorer import Scorer
from tests.server.conftest import PROMPT, jpeg, metric

IMAGES = [jpeg(i) for i in range(5)]


def score_inputs(prompts: list[str], images: list[bytes]) -> list[triton.InferInput]:
    prompt = triton.InferInput("PROMPT", [len(prompts), 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[p.encode()] for p in prompts], dtype=object))
    image = triton.InferInput("IMAGE", [len(images), 1], "BYTES")
    image.set_data_from_numpy(np.array([[b] for b in images], dtype=object))
    return [prompt, image]


@pytest.fixture(scope="module")
def expected(server):
    with Client(server.address) as client:
        return np.array(client.score(PROMPT, IMAGES))  # scoring.v1's answer


@pytest.fixture
def tc(server):
    with triton.InferenceServerClient(server.address) as client:
        yield client


def test_sync_infer_matches_scoring_v1(tc, expected):
    result = tc.infer("pickscore", score_inputs([PROMPT], IMAGES), outputs=[triton.InferRequestedOutput("SCORE")])
    np.testing.assert_allclose(result.as_numpy("SCORE")[:, 0], expected, atol=1e-6)
    assert result.as_numpy("SCORE").shape == (5, 1) and result.as_numpy("SCORE").dtype == np.float32


def test_pairs_and_priority_and_timeout_parameters(tc, server):
    prompts = [PROMPT, "a cat", "a dog"]
    result = tc.infer("pickscore", score_inputs(prompts, IMAGES[:3]), priority=1, timeout=30_000_000)
    with Client(server.address) as client:
        np.testing.assert_allclose(result.as_numpy("SCORE")[:, 0], client.score_pairs(prompts, IMAGES[:3]), atol=1e-6)


def test_async_infer_with_callback(tc, expected):
    answers: queue.Queue = queue.Queue()
    tc.async_infer(
        "pickscore", score_inputs([PROMPT], IMAGES), callback=lambda result, error: answers.put((result, error))
    )
    result, error = answers.get(timeout=30)
    assert error is None
    np.testing.assert_allclose(result.as_numpy("SCORE")[:, 0], expected, atol=1e-6)


def test_stream_infer(tc, expected):
    answers: queue.Queue = queue.Queue()
    tc.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(len(IMAGES)):
            tc.async_stream_infer("pickscore", score_inputs([PROMPT], [IMAGES[i]]), request_id=str(i))
        tc.async_stream_infer("pickscore", score_inputs([PROMPT], [b"not an image"]), request_id="bad")
        got, errors = {}, []
        for _ in range(len(IMAGES) + 1):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(str(error))
            else:
                got[result.get_response().id] = result.as_numpy("SCORE")[0, 0]
    finally:
        tc.stop_stream()
    np.testing.assert_allclose([got[str(i)] for i in range(len(IMAGES))], expected, atol=1e-6)
    assert len(errors) == 1 and "INVALID_ARGUMENT" in errors[0] and "image 0: not a decodable image" in errors[0]


def test_aio_client(server, expected):
    async def run():
        async with triton_aio.InferenceServerClient(server.address) as client:
            assert await client.is_server_ready() and await client.is_model_ready("pickscore")
            return await client.infer("pickscore", score_inputs([PROMPT], IMAGES))

    np.testing.assert_allclose(asyncio.run(run()).as_numpy("SCORE")[:, 0], expected, atol=1e-6)


def test_tower_models_match_the_scorer(tc, tiny_hf_dir):
    scorer = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")
    pixels = np.stack([load_pixels(b, scorer.preprocess_config) for b in IMAGES])  # (5, 3, 224, 224)
    for dtype, datatype in ((np.float32, "FP32"), (np.float16, "FP16")):
        inp = triton.InferInput("pixel_values", list(pixels.shape), datatype)
        inp.set_data_from_numpy(pixels.astype(dtype))
        embeds = tc.infer("pickscore_image", [inp]).as_numpy("image_embeds")
        np.testing.assert_allclose(embeds, scorer.encode_pixels(pixels.astype(dtype).astype(np.float32)), atol=1e-5)
    tokens = scorer.tokenizer([PROMPT, "a cat"])
    inp = triton.InferInput("input_ids", list(tokens.shape), "INT64")
    inp.set_data_from_numpy(tokens)
    np.testing.assert_allclose(
        tc.infer("pickscore_text", [inp]).as_numpy("text_embeds"), scorer.encode_text([PROMPT, "a cat"]), atol=1e-5
    )


def test_typed_contents_are_accepted(server, expected):
    request = pb.ModelInferRequest(model_name="pickscore")
    request.inputs.add(name="PROMPT", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(PROMPT.encode())
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[len(IMAGES)]).contents.bytes_contents.extend(IMAGES)
    with grpc.insecure_channel(server.address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    scores = np.frombuffer(response.raw_output_contents[0], "<f4")
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_metadata_config_and_statistics(tc, server):
    configs = model_configs(16, (224, 224), 77, 32, 256, 5000, pixels=True)
    exported = model_configs(16, (224, 224), 77, 32, 256, 5000)  # what the Triton export declares
    for name, config in configs.items():
        served = tc.get_model_config(name).config
        assert served.parameters["identity"].string_value.startswith("pickscore:clip:fp32:")  # test_identity.py
        del served.parameters["identity"]
        assert served == config
        meta = tc.get_model_metadata(name)
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            (t.name, {11: "FP32", 9: "INT64", 2: "UINT8", 13: "BYTES"}[t.data_type], [-1, *t.dims])
            for t in config.input
        ]
        # The export's models are these, but for the ensemble's PIXELS extension (IMAGE required there).
        assert [t.name for t in exported[name].input] == [t.name for t in config.input if t.name != "PIXELS"]
        assert [t.name for t in meta.outputs] == [t.name for t in config.output]
    assert tc.get_server_metadata().name == "pickscore"
    assert tc.is_server_live() and tc.is_server_ready()
    before = tc.get_inference_statistics("pickscore").model_stats[0]
    tc.infer("pickscore", score_inputs([PROMPT], IMAGES[:2]))
    after = tc.get_inference_statistics("pickscore").model_stats[0]
    assert after.execution_count == before.execution_count + 1
    assert after.inference_count == before.inference_count + 2
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert metric(server, "pickscore_requests_total", rpc="ModelInfer", code="OK") >= 1


def raw_request(model: str, tensors: list[tuple[str, str, list[int], bytes]]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def lp(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


@pytest.mark.parametrize(
    "request_, message",
    [
        (
            raw_request(
                "pickscore", [("PROMPTS", "BYTES", [1, 1], lp(b"x")), ("IMAGE", "BYTES", [1, 1], lp(IMAGES[0]))]
            ),
            "input 'PROMPTS': model 'pickscore' has no such input",
        ),
        (raw_request("pickscore", [("IMAGE", "BYTES", [1, 1], lp(IMAGES[0]))]), "input 'PROMPT': missing"),
        (
            raw_request(
                "pickscore", [("PROMPT", "FP32", [1, 1], b"\0" * 4), ("IMAGE", "BYTES", [1, 1], lp(IMAGES[0]))]
            ),
            "input 'PROMPT': datatype FP32; expected BYTES",
        ),
        (
            raw_request(
                "pickscore", [("PROMPT", "BYTES", [1, 2], lp(b"a", b"b")), ("IMAGE", "BYTES", [1, 1], lp(IMAGES[0]))]
            ),
            "input 'PROMPT': shape [1, 2]; expected [-1, 1]",
        ),
        (
            raw_request(
                "pickscore",
                [
                    ("PROMPT", "BYTES", [1, 1], struct.pack("<I", 99) + b"short"),
                    ("IMAGE", "BYTES", [1, 1], lp(IMAGES[0])),
                ],
            ),
            "input 'PROMPT': BYTES element 0 declares 99 bytes but 5 remain",
        ),
        (
            raw_request(
                "pickscore", [("PROMPT", "BYTES", [1, 1], lp(b"a")), ("IMAGE", "BYTES", [2, 1], lp(IMAGES[0]))]
            ),
            "input 'IMAGE': 1 elements for shape [2, 1] (2 expected)",
        ),
        (
            raw_request("pickscore", [("PROMPT", "BYTES", [1, 1], lp(b"a")), ("IMAGE", "BYTES", [1, 1], lp(b"junk"))]),
            "image 0: not a decodable image",
        ),
        (
            raw_request("pickscore_image", [("pixel_values", "FP32", [1, 3, 224, 224], b"\0" * 100)]),
            "input 'pixel_values': 100 bytes of raw data for shape [1, 3, 224, 224] (602112 expected)",
        ),
        (
            raw_request("pickscore_image", [("pixel_values", "FP32", [1, 3, 64, 64], b"\0" * (4 * 3 * 64 * 64))]),
            "input 'pixel_values': shape [1, 3, 64, 64]; expected [-1, 3, 224, 224]",
        ),
        (
            raw_request("pickscore_text", [("input_ids", "INT32", [1, 77], b"\0" * 308)]),
            "input 'input_ids': datatype INT32; expected INT64",
        ),
        (
            raw_request(
                "pickscore_text", [("input_ids", "INT64", [1, 77], np.full((1, 77), 10**6, np.int64).tobytes())]
            ),
            "input 'input_ids': token ids must lie in [0, 49408)",
        ),
    ],
)
def test_bad_tensors_are_invalid_argument_naming_the_tensor(server, tc, request_, message):
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details(), info.value.details()
    assert tc.is_server_ready()  # still serving


def test_unknown_model_is_not_found(tc):
    for call in (
        lambda: tc.infer("clip", score_inputs([PROMPT], IMAGES[:1])),
        lambda: tc.get_model_metadata("clip"),
        lambda: tc.get_model_metadata("pickscore", model_version="7"),
    ):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "unknown model 'clip'; this server has pickscore, pickscore_image, pickscore_text" in str(
        pytest.raises(InferenceServerException, tc.get_model_config, "clip").value
    )
    assert tc.is_server_ready()


def test_unknown_requested_output_fails_before_compute_and_counts_as_failure(server, tc):
    request = raw_request(
        "pickscore", [("PROMPT", "BYTES", [1, 1], lp(b"a")), ("IMAGE", "BYTES", [1, 1], lp(IMAGES[0]))]
    )
    request.outputs.add(name="SCORES")
    before = tc.get_inference_statistics("pickscore").model_stats[0].inference_stats
    passes = metric(server, "pickscore_inference_seconds_count", tower="image")
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output 'SCORES': model 'pickscore' has outputs SCORE" in info.value.details()
    after = tc.get_inference_statistics("pickscore").model_stats[0].inference_stats
    assert (after.success.count, after.fail.count) == (before.success.count, before.fail.count + 1)
    assert metric(server, "pickscore_inference_seconds_count", tower="image") == passes


def test_pixels_input_scores_as_the_encoded_images(tc, server):
    """PIXELS (UINT8 [N, H, W, 3]) instead of IMAGE: the same scores as PNGs of those pixels."""
    import io

    from PIL import Image

    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (3, 240, 320, 3), dtype=np.uint8)
    pngs = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, "PNG")
        pngs.append(buf.getvalue())
    prompt = triton.InferInput("PROMPT", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
    raw = triton.InferInput("PIXELS", list(pixels.shape), "UINT8")
    raw.set_data_from_numpy(pixels)
    scores = tc.infer("pickscore", [prompt, raw]).as_numpy("SCORE")[:, 0]
    with Client(server.address) as client:
        np.testing.assert_allclose(scores, client.score(PROMPT, pngs), atol=1e-5)
    both = [*score_inputs([PROMPT], IMAGES[:3]), raw]
    with pytest.raises(InferenceServerException, match="IMAGE .* or PIXELS"):
        tc.infer("pickscore", both)
    with pytest.raises(InferenceServerException, match="IMAGE .* or PIXELS"):
        tc.infer("pickscore", [prompt])
