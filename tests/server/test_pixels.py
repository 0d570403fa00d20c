"""Raw pixels in: callers holding decoded images skip encode and decode, and get the scores of a lossless PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pickscore.client import Client
from pickscore.errors import InvalidInput
from pickscore.model.preprocess import PreprocessConfig, load_uint8
from pickscore.scorer import Scorer
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc
from tests.conftest import _picture
from tests.server.conftest import PROMPT


def arrays() -> list[np.ndarray]:
    """Generated-image-like pixels of several sizes and shapes: RGB, RGBA with transparency, gray."""
    rng = np.random.default_rng(7)
    rgb = [_picture(rng, w, h) for w, h in [(512, 512), (640, 384), (224, 224), (300, 1500)]]
    rgba = np.concatenate([_picture(rng, 256, 256), rng.integers(0, 256, (256, 256, 1), dtype=np.uint8)], axis=2)
    return [*rgb, rgba, _picture(rng, 200, 120)[..., 0]]


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_pixels_score_as_their_lossless_png(server):
    with Client(server.address) as client:
        raw = client.score(PROMPT, arrays())
        encoded = client.score(PROMPT, [png(a) for a in arrays()])
    np.testing.assert_allclose(raw, encoded, atol=1e-5, rtol=0)  # batches may form differently: float noise only
    for a in arrays():  # what the towers see is identical, sample for sample
        np.testing.assert_array_equal(load_uint8(a, PreprocessConfig()), load_uint8(png(a), PreprocessConfig()))


def test_the_scorer_takes_pixel_arrays_too(tiny_hf_dir):
    scorer = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")
    np.testing.assert_allclose(
        scorer.score(PROMPT, arrays()), scorer.score(PROMPT, [png(a) for a in arrays()]), atol=0, rtol=0
    )


@pytest.mark.parametrize(
    "pixels,reason",
    [
        (pb.Pixels(height=4, width=4, channels=3, data=b"\0" * 47), "47 bytes of pixels for 4x4x3"),
        (pb.Pixels(height=4, width=4, channels=2, data=b"\0" * 32), "2 channels"),
        (pb.Pixels(height=0, width=4, channels=3, data=b""), "empty"),
    ],
)
def test_bad_pixels_are_named(server, pixels, reason):
    import grpc

    stub = scoring_pb2_grpc.ScoringServiceStub(grpc.insecure_channel(server.address))
    request = pb.ScoreRequest(prompt=PROMPT, images=[pb.Image(data=png(arrays()[2])), pb.Image(pixels=pixels, id="x")])
    with pytest.raises(grpc.RpcError) as error:
        stub.Score(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 1 (id 'x'): " in error.value.details() and reason in error.value.details()


def test_data_and_pixels_together_are_refused(server):
    with Client(server.address) as client, pytest.raises(InvalidInput, match="either data or pixels"):
        client._call(
            client.stub.Score,
            pb.ScoreRequest(
                prompt=PROMPT, images=[pb.Image(data=b"x", pixels=pb.Pixels(height=1, width=1, data=b"abc"))]
            ),
            None,
        )
