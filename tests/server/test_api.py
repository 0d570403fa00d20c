"""The transport-neutral api without a server: scoring and the KServe v2 models over a repository of one stub
engine, their checks and messages, and their plain answers against the gRPC messages the kserve_v2 transport makes
of them."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kpb

from pickscore.errors import InvalidInput, NotFound
from pickscore.model.scoring import rank_scores
from pickscore.server import tensors
from pickscore.server.api import ModelInfo, RankedImage, RawPixels, ScoredImage, Scoring, image_item
from pickscore.server.api_kserve import InferRequest, InputTensor, KServeModels, triton_json
from pickscore.server.engine import ImageItem, ScoreStats, Shared
from pickscore.server.kserve_v2 import _message
from pickscore.server.metrics import Metrics
from pickscore.server.repository import ModelSpec, Repository, ServedModel
from pickscore.server.settings import Settings


class StubEngine:
    """Scores are the image's index; embeddings are zeros. Each call is recorded as (method, args)."""

    def __init__(self):
        self.settings = Settings(model="stub")
        self.backend = SimpleNamespace(
            source="stub-model",
            name="torch",
            description="cpu fp32",
            embed_dim=4,
            logit_scale=100.0,
            preprocess=SimpleNamespace(output_size=(224, 224)),
            tokenizer=SimpleNamespace(context_length=77, encoder=dict.fromkeys(range(10))),
            weights_bytes=1234,
            kind="clip",
            joint=False,
            precision="fp32",
            weights_digest="0123456789abcdef" * 4,
        )
        self.calls = []
        self.stats = ScoreStats()
        self.hung = False

    async def score(self, prompts, images, deadline, priority=0):
        self.calls.append(("score", prompts, images, deadline, priority))
        return np.arange(len(images), dtype=np.float32)

    async def rank(self, prompt, images, top_k, deadline):
        self.calls.append(("rank", prompt, images, top_k, deadline))
        return rank_scores(np.arange(len(images), dtype=np.float32), top_k)

    async def embed_tokens(self, tokens, deadline, priority=0):
        self.calls.append(("embed_tokens", tokens, deadline, priority))
        return np.zeros((len(tokens), 4), np.float32)


def served(engine: StubEngine) -> Repository:
    """A repository serving ``engine`` as the model pickscore, version 1."""
    repository = Repository(engine.settings, Metrics(), Shared(engine.settings))
    repository.serving["pickscore"] = ServedModel(ModelSpec("pickscore", "stub"), engine)
    repository.default = "pickscore"
    return repository


def ready_state(**overrides):
    return SimpleNamespace(**{"ready": True, "draining": False, "unhealthy": "", **overrides})


def run(coro):
    return asyncio.run(coro)


# scoring -----------------------------------------------------------------------------------------------------


def test_score_takes_prompt_or_prompts_not_both():
    engine = StubEngine()
    scoring = Scoring(served(engine))
    items = [ImageItem(b"a", "x"), ImageItem(b"b")]
    with pytest.raises(InvalidInput, match=r"set either prompt \(one for all images\) or prompts"):
        run(scoring.score("a cat", ["a", "b"], items, None))
    assert run(scoring.score("a cat", [], items, 7.0)) == [ScoredImage(0, "x", 0.0), ScoredImage(1, "", 1.0)]
    assert engine.calls[-1][1] == ["a cat"] and engine.calls[-1][3] == 7.0
    run(scoring.score("", ["a", "b"], items, None))
    assert engine.calls[-1][1] == ["a", "b"]


def test_rank_is_best_first_and_top_k_0_means_every_image():
    engine = StubEngine()
    scoring = Scoring(served(engine))
    items = [ImageItem(b"a", "x"), ImageItem(b"b", "y"), ImageItem(b"c", "z")]
    ranking = run(scoring.rank("a cat", items, 0, None))
    assert [(r.index, r.id) for r in ranking] == [(2, "z"), (1, "y"), (0, "x")]
    assert all(isinstance(r, RankedImage) for r in ranking)
    assert sum(r.probability for r in ranking) == pytest.approx(1.0)
    assert engine.calls[-1][3] is None
    assert len(run(scoring.rank("a cat", items, 1, None))) == 1


def test_model_info_is_the_backends_and_the_settings():
    info = Scoring(served(StubEngine())).model_info()
    assert isinstance(info, ModelInfo)
    assert (info.source, info.backend, info.embed_dim, info.image_size, info.context_length) == (
        "stub-model",
        "torch",
        4,
        224,
        77,
    )
    assert info.max_images_per_request == Settings(model="stub").max_images_per_request
    assert (info.model, info.model_version, info.weights_bytes) == ("pickscore", "1", 1234)
    assert info.identity == "pickscore:clip:fp32:0123456789abcdef"


def test_raw_pixels_are_checked_against_their_shape():
    rgb = image_item(0, pixels=RawPixels(2, 3, 0, bytes(18)))  # 0 channels: RGB
    assert rgb.pixels.shape == (2, 3, 3) and rgb.data == b""
    assert image_item(1, pixels=RawPixels(2, 3, 1, bytes(6))).pixels.shape == (2, 3)  # gray
    assert image_item(2, b"jpeg", "a").pixels is None
    with pytest.raises(InvalidInput, match=r"image 1 \(id 'b'\): pixels have 2 channels; 1 \(gray\), 3 \(RGB\)"):
        image_item(1, id="b", pixels=RawPixels(2, 2, 2, bytes(8)))
    with pytest.raises(InvalidInput, match=r"image 0: 5 bytes of pixels for 2x2x3 \(12 expected\)"):
        image_item(0, pixels=RawPixels(2, 2, 3, bytes(5)))


# KServe v2 ---------------------------------------------------------------------------------------------------


def tokens_input(shape=(1, 77), datatype="INT64", value=1) -> InputTensor:
    array = np.full(shape, value, np.int64)
    return InputTensor("input_ids", datatype, shape, lambda: array)


def never_read() -> np.ndarray:
    raise AssertionError("read before its name, datatype and shape were checked")


@pytest.mark.parametrize(
    "model, inputs, message",
    [
        ("pickscore_text", [InputTensor("ids", "INT64", (1, 77), never_read)], "input 'ids': model 'pickscore_text'"),
        ("pickscore_text", [tokens_input(), tokens_input()], "input 'input_ids': given more than once"),
        ("pickscore_text", [], "input 'input_ids': missing (model 'pickscore_text' takes input_ids)"),
        (
            "pickscore_text",
            [InputTensor("input_ids", "INT32", (1, 77), never_read)],
            "input 'input_ids': datatype INT32; expected INT64",
        ),
        (
            "pickscore_text",
            [InputTensor("input_ids", "INT64", (1, 76), never_read)],
            "input 'input_ids': shape [1, 76]; expected [-1, 77] (batch first, at least 1)",
        ),
        (
            "pickscore_image",
            [InputTensor("pixel_values", "FP64", (1, 3, 224, 224), never_read)],
            "input 'pixel_values': datatype FP64; expected FP32 or FP16",
        ),
        ("pickscore_text", [tokens_input(value=10)], "input 'input_ids': token ids must lie in [0, 10); got 10..10"),
        (
            "pickscore",
            [InputTensor("PROMPT", "BYTES", (1,), lambda: np.array([b"a"], dtype=object))],
            "give the images as IMAGE (encoded, BYTES) or PIXELS (UINT8 [N, H, W, 3]): one",
        ),
    ],
)
def test_inputs_are_checked_by_name_datatype_and_shape_before_they_are_read(model, inputs, message):
    models = KServeModels(served(StubEngine()), ready_state())
    with pytest.raises(InvalidInput) as info:
        run(models.infer(InferRequest(model, "", "r", inputs), None))
    assert message in str(info.value)
    assert models.stats[(model, "1")].fail[0] == 1 and models.stats[(model, "1")].success[0] == 0


def test_infer_answers_fp32_tensors_and_counts_them():
    engine = StubEngine()
    models = KServeModels(served(engine), ready_state())
    response = run(models.infer(InferRequest("pickscore_text", "1", "r-1", [tokens_input((3, 77))]), None))
    assert (response.model, response.version, response.id) == ("pickscore_text", "1", "r-1")
    [tensor] = response.outputs
    assert (tensor.name, tensor.datatype, tensor.array.shape, tensor.array.dtype) == (
        "text_embeds",
        "FP32",
        (3, 4),
        np.float32,
    )
    stats = models.statistics("pickscore_text", "")["model_stats"][0]
    assert (stats["execution_count"], stats["inference_count"], stats["inference_stats"]["success"]["count"]) == (
        1,
        3,
        1,
    )


def test_an_unknown_output_fails_before_compute():
    engine = StubEngine()
    models = KServeModels(served(engine), ready_state())
    request = InferRequest("pickscore_text", "", "", [tokens_input()], outputs=["embeds"])
    with pytest.raises(InvalidInput, match="output 'embeds': model 'pickscore_text' has outputs text_embeds"):
        run(models.infer(request, None))
    assert engine.calls == []


def test_priority_and_timeout_parameters():
    engine = StubEngine()
    models = KServeModels(served(engine), ready_state())

    async def infer(parameters, deadline=None):
        request = InferRequest("pickscore_text", "", "", [tokens_input()], parameters=parameters)
        now = asyncio.get_running_loop().time()
        await models.infer(request, deadline if deadline is None else now + deadline)
        _, _, given, priority = engine.calls[-1]
        return priority, None if given is None else given - now

    priority, remaining = run(infer({"priority": 2, "timeout": 5_000_000}))
    assert priority == 2 and remaining == pytest.approx(5, abs=0.5)
    assert run(infer({"timeout": 5_000_000}, deadline=1.0))[1] == pytest.approx(1, abs=0.5)  # the nearer one
    assert run(infer({"timeout": 0})) == (0, None)
    with pytest.raises(InvalidInput, match="parameter 'priority': must not be negative, got -1"):
        run(infer({"priority": -1}))
    with pytest.raises(InvalidInput, match="parameter 'timeout': must be an integer, got str"):
        run(infer({"timeout": "soon"}))


def test_unknown_models_and_versions_are_not_found():
    models = KServeModels(served(StubEngine()), ready_state())
    with pytest.raises(NotFound, match="unknown model 'clip'; this server has pickscore, pickscore_image, pickscore_t"):
        models.metadata("clip", "")
    with pytest.raises(NotFound, match="model 'pickscore' has no version '7' in service; it serves version 1"):
        models.config("pickscore", "7")
    with pytest.raises(NotFound):
        run(models.infer(InferRequest("clip", "", "", []), None))
    with pytest.raises(NotFound):
        models.model_ready("clip", "")


def test_readiness_follows_the_server_state():
    state = ready_state()
    models = KServeModels(served(StubEngine()), state)
    assert models.ready() and models.model_ready("pickscore", "1")
    for flag, value in (("ready", False), ("draining", True), ("unhealthy", "hung")):
        setattr(state, flag, value)
        assert not models.ready() and not models.model_ready("pickscore", "")
        setattr(state, flag, getattr(ready_state(), flag))


def test_plain_answers_are_the_protocols_json_form_of_the_grpc_messages():
    models = KServeModels(served(StubEngine()), ready_state())
    run(models.infer(InferRequest("pickscore_text", "", "", [tokens_input()]), None))
    models.stats[("pickscore_text", "1")].last_inference_ms = 2**40  # 64 bits: a number, not protobuf's string
    answers = [
        (models.server_metadata(), kpb.ServerMetadataResponse),
        (models.statistics("", ""), kpb.ModelStatisticsResponse),
    ]
    identity = "pickscore:clip:fp32:0123456789abcdef"
    for name in ("pickscore", "pickscore_image", "pickscore_text"):
        metadata = models.metadata(name, "")  # the identity too, which the gRPC message has no field for:
        assert metadata.pop("identity") == identity  # its configuration's parameters carry it there
        assert models.model_config(name, "").parameters["identity"].string_value == identity
        answers += [(metadata, kpb.ModelMetadataResponse), (models.config(name, ""), mc.ModelConfig)]
    for plain, cls in answers:
        assert triton_json(_message(plain, cls)) == plain
    assert models.config("pickscore", "")["input"][0]["dims"] == [1]
    assert _message(models.config("pickscore_image", ""), mc.ModelConfig) == models.model_config("pickscore_image", "")
    pickscore = models.metadata("pickscore", "")
    assert [(t["name"], t["datatype"], t["shape"]) for t in pickscore["inputs"]] == [
        ("PROMPT", "BYTES", [-1, 1]),
        ("IMAGE", "BYTES", [-1, 1]),
        ("PIXELS", "UINT8", [-1, -1, -1, 3]),
    ]


# KServe's raw tensor form ------------------------------------------------------------------------------------


def test_raw_and_listed_tensor_data():
    raw = b"".join(len(x).to_bytes(4, "little") + x for x in (b"a", b"bc"))
    assert tensors.from_raw("P", "BYTES", (2, 1), raw).reshape(-1).tolist() == [b"a", b"bc"]
    with pytest.raises(InvalidInput, match="input 'P': BYTES element 0 has a cut length prefix"):
        tensors.from_raw("P", "BYTES", (1,), b"\x01\x00")
    with pytest.raises(InvalidInput, match=r"input 'P': 1 elements for shape \[2, 1\] \(2 expected\)"):
        tensors.from_raw("P", "BYTES", (2, 1), raw[:5])
    numbers = np.arange(6, dtype="<i8")
    assert tensors.from_raw("t", "INT64", (2, 3), numbers.tobytes()).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(InvalidInput, match=r"input 't': 8 bytes of raw data for shape \[2, 3\] \(48 expected\)"):
        tensors.from_raw("t", "INT64", (2, 3), numbers[:1].tobytes())
    assert tensors.from_values("t", "FP32", (1, 2), [[0.5, 1.5]]).tolist() == [[0.5, 1.5]]
    with pytest.raises(InvalidInput, match=r"input 't': 3 values for shape \[1, 2\] \(2 expected\)"):
        tensors.from_values("t", "FP32", (1, 2), [1, 2, 3])
    with pytest.raises(InvalidInput, match="input 't': data is not a regular array of UINT8"):
        tensors.from_values("t", "UINT8", (1,), [300])
    assert tensors.to_raw("FP32", np.array([1.0], np.float64)) == np.array([1.0], "<f4").tobytes()
