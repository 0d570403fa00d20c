"""Property-based fuzzing of a real server on loopback (Hypothesis, bounded example counts so CI stays fast):
whatever the image bytes, request fields or KServe tensors, every answer is OK, INVALID_ARGUMENT or NOT_FOUND,
and afterwards the server is SERVING and scores exactly as before."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc

from pickscore.client import Client
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc
from tests.conftest import varied_images
from tests.server.conftest import PROMPT, jpeg

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
SEEDS = [data for _, data, _ in varied_images()] + [jpeg(0), jpeg(1, size=256)]
FUZZ = hsettings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None
)


@st.composite
def mutated_image(draw) -> bytes:
    """A real encoded image with bytes flipped, cut, inserted or repeated; sometimes random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=2048))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 4, 6]))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "header"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            data = data[:at]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 256))] * draw(st.integers(1, 8))
        elif kind == "header" and len(data) > 32:  # sizes and flags live here
            data[draw(st.integers(0, 31))] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def image_message(draw) -> pb.Image:
    ident = draw(st.text(max_size=12))
    if draw(st.integers(0, 4)) == 0:  # raw pixels with any geometry, right or wrong
        h, w = draw(st.integers(0, 70)), draw(st.integers(0, 70))
        c = draw(st.sampled_from([0, 1, 2, 3, 4, 5]))
        size = draw(st.sampled_from([h * w * max(c, 1), h * w * 3, draw(st.integers(0, 4000))]))
        data = draw(st.binary(min_size=size, max_size=size)) if size <= 16000 else b""
        return pb.Image(pixels=pb.Pixels(height=h, width=w, channels=c, data=data), id=ident)
    return pb.Image(data=draw(mutated_image()), id=ident)


prompts = st.one_of(
    st.just(PROMPT), st.just(PROMPT), st.text(max_size=300), st.sampled_from(["", "   ", "\x00", "🐈" * 200])
)


@st.composite
def score_request(draw) -> pb.ScoreRequest:
    images = draw(st.lists(image_message(), min_size=0, max_size=4))
    request = pb.ScoreRequest(images=images)
    if draw(st.booleans()):
        request.prompt = draw(prompts)
    if draw(st.integers(0, 3)) == 0:
        request.prompts.extend(draw(st.lists(prompts, max_size=5)))
    return request


DATATYPES = ["BYTES", "UINT8", "FP32", "FP16", "INT64", "INT32", "BOOL", "FP64", "WHAT"]
INPUT_NAMES = ["PROMPT", "IMAGE", "PIXELS", "pixel_values", "input_ids", "nope"]


@st.composite
def infer_request(draw) -> kpb.ModelInferRequest:
    model = draw(st.sampled_from(["pickscore", "pickscore_image", "pickscore_text", "unknown", ""]))
    request = kpb.ModelInferRequest(model_name=model, model_version=draw(st.sampled_from(["", "1", "7"])))
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(INPUT_NAMES)),
            datatype=draw(st.sampled_from(DATATYPES)),
            shape=draw(st.lists(st.integers(-2, 300), max_size=5)),
        )
        if draw(st.booleans()):
            request.raw_input_contents.append(draw(st.binary(max_size=4096)))
        elif tensor.datatype == "BYTES":
            tensor.contents.bytes_contents.extend(draw(st.lists(mutated_image(), max_size=3)))
        elif tensor.datatype == "FP32":
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=64)))
        elif tensor.datatype in ("INT64", "INT32"):
            tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-(2**40), 2**40), max_size=80)))
    if draw(st.booleans()):
        request.parameters["priority"].int64_param = draw(st.integers(-5, 2**40))
    if draw(st.booleans()):
        request.parameters["timeout"].int64_param = draw(st.integers(-5, 2**40))
    return request


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.address)
    yield scoring_pb2_grpc.ScoringServiceStub(channel), service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def before(server):
    with Client(server.address) as client:
        return client.score(PROMPT, [jpeg(i) for i in range(3)])


def _answer(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        assert e.details(), e.code()
        return e.code()
    return grpc.StatusCode.OK


@FUZZ
@given(request=score_request())
def test_fuzzed_score_requests(stubs, before, request):
    code = _answer(lambda: stubs[0].Score(request, timeout=30))
    assert code in ALLOWED, code


@FUZZ
@given(request=score_request(), top_k=st.integers(-3, 10))
def test_fuzzed_rank_requests(stubs, before, request, top_k):
    rank = pb.RankRequest(prompt=request.prompt, images=request.images, top_k=max(top_k, 0))
    code = _answer(lambda: stubs[0].Rank(rank, timeout=30))
    assert code in ALLOWED, code


@FUZZ
@given(request=infer_request())
def test_fuzzed_kserve_tensors(stubs, before, request):
    code = _answer(lambda: stubs[1].ModelInfer(request, timeout=30))
    assert code in ALLOWED, code


def test_after_the_fuzzing_the_server_serves_and_scores_as_before(server, stubs, before):
    """Runs after the fuzz tests of this module (pytest keeps file order)."""
    with grpc.insecure_channel(server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with Client(server.address) as client:
        np.testing.assert_array_equal(client.score(PROMPT, [jpeg(i) for i in range(3)]), before)
