"""Four kinds of scorer in one real server: PickScore (a CLIP in Hugging Face layout), HPS v2, the LAION aesthetic
predictor and ImageReward, each from its published layout. Served scores equal the authors' reference code's; one
Rewards request weighs all four with one decode per image per preprocessing; KServe and HTTP describe each kind."""

from __future__ import annotations

import io
import json
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image

from pickscore import Scorer
from pickscore.server.app import ServerThread
from pickscore.v1 import scoring_pb2 as pb
from pickscore.v1 import scoring_pb2_grpc
from tests.model.image_reward_layout import write_image_reward
from tests.model.kind_layouts import write_aesthetic, write_hps
from tests.model.test_image_reward import image_reward_reference_scores
from tests.model.test_kinds import aesthetic_reference_scores, hps_reference_scores
from tests.server.conftest import PROMPT, jpeg, metric, settings_for

IMAGES = [jpeg(i, size=96 + 37 * i) for i in range(5)]  # odd and even margins around the crop
PROMPTS = [PROMPT, "an oil painting of a lighthouse at dusk", "a cat", "two dogs playing chess", "Ünïcode!"]
KINDS = {"pickscore": "clip", "hps": "hps", "aesthetic": "aesthetic", "imagereward": "image_reward"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_hf_dir):
    root = tmp_path_factory.mktemp("kinds")
    return {
        "pickscore": tiny_hf_dir,
        "hps": write_hps(root / "hps", seed=5),
        "aesthetic": write_aesthetic(root / "aesthetic", seed=6),
        "imagereward": write_image_reward(root / "imagereward", seed=7),
    }


@pytest.fixture(scope="module")
def server(dirs):
    models = ",".join(f"{name}={path}" for name, path in dirs.items())
    with ServerThread(settings_for(models, max_batch_size=4)) as s:
        yield s


@pytest.fixture(scope="module")
def reference(dirs) -> dict[str, np.ndarray]:
    """Each model's scores for (PROMPTS[i], IMAGES[i]) from its authors' code (PickScore: this package in-process,
    itself tested against transformers)."""
    pictures = [Image.open(io.BytesIO(b)) for b in IMAGES]
    scorer = Scorer.from_pretrained(dirs["pickscore"], device="cpu", dtype="fp32")
    return {
        "pickscore": np.array([scorer.score(p, [b])[0] for p, b in zip(PROMPTS, IMAGES)]),
        "hps": np.array([hps_reference_scores(dirs["hps"], p, [x])[0] for p, x in zip(PROMPTS, pictures)]),
        "aesthetic": aesthetic_reference_scores(dirs["aesthetic"], pictures),
        "imagereward": np.array(
            [image_reward_reference_scores(dirs["imagereward"], p, [x])[0] for p, x in zip(PROMPTS, pictures)]
        ),
    }


def _stub(server):
    channel = grpc.insecure_channel(server.address)
    return channel, scoring_pb2_grpc.ScoringServiceStub(channel)


def test_every_kind_serves_its_reference_scores(server, reference):
    channel, stub = _stub(server)
    with channel:
        for name in KINDS:
            request = pb.ScoreRequest(prompts=PROMPTS, images=[pb.Image(data=b) for b in IMAGES], model=name)
            served = np.array([r.score for r in stub.Score(request, timeout=120).results])
            np.testing.assert_allclose(served, reference[name], atol=1e-4, rtol=0, err_msg=name)
        kinds = {m.model: m.kind for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert kinds == KINDS
        info = stub.GetModelInfo(pb.GetModelInfoRequest(model="hps"))
        assert info.logit_scale == 0.0 and info.image_size == 224
        one_prompt = pb.ScoreRequest(prompt="anything at all", images=[pb.Image(data=b) for b in IMAGES])
        one_prompt.model = "aesthetic"  # prompt-independent: any prompt gives the image's own score
        served = np.array([r.score for r in stub.Score(one_prompt, timeout=120).results])
        np.testing.assert_allclose(served, reference["aesthetic"], atol=1e-4, rtol=0)


def test_one_rewards_request_weighs_four_kinds_with_one_decode_per_preprocessing(server, reference):
    weights = {"pickscore": 1.0, "hps": 2.0, "aesthetic": 0.5, "imagereward": -0.25}
    channel, stub = _stub(server)
    with channel:
        before = metric(server, "pickscore_images_decoded_total")
        response = stub.Rewards(
            pb.RewardsRequest(
                prompts=PROMPTS,
                images=[pb.Image(data=b) for b in IMAGES],
                models=[pb.ModelWeight(model=m, weight=w) for m, w in weights.items()],
            ),
            timeout=120,
        )
        # PickScore crops as transformers does; HPS, the aesthetic predictor and ImageReward as torchvision does
        assert metric(server, "pickscore_images_decoded_total") - before == 2 * len(IMAGES)
    want = sum(w * reference[m] for m, w in weights.items())
    np.testing.assert_allclose(response.rewards, want, atol=1e-3, rtol=0)
    for part in response.models:
        np.testing.assert_allclose(part.scores, reference[part.model], atol=1e-4, rtol=0)


def test_kserve_and_http_describe_each_kind(server, reference):
    client = triton.InferenceServerClient(server.address)
    assert {m.name for m in client.get_model_repository_index().models} == set(KINDS)
    assert client.is_model_ready("hps_image") and client.is_model_ready("aesthetic_text")
    with pytest.raises(triton.InferenceServerException, match="unknown model .imagereward_image.*, imagereward$"):
        client.get_model_metadata("imagereward_image")  # a joint kind's towers are not models of their own
    config = client.get_model_config("imagereward").config
    assert config.backend == "pytorch" and not config.ensemble_scheduling.step
    prompt = triton.InferInput("PROMPT", [len(IMAGES), 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[p.encode()] for p in PROMPTS], dtype=object))
    image = triton.InferInput("IMAGE", [len(IMAGES), 1], "BYTES")
    image.set_data_from_numpy(np.array([[b] for b in IMAGES], dtype=object))
    result = client.infer("imagereward", [prompt, image])
    np.testing.assert_allclose(result.as_numpy("SCORE")[:, 0], reference["imagereward"], atol=1e-4, rtol=0)
    port = server.server.http_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
        listed = json.loads(r.read())
    assert {m["model"]: m["kind"] for m in listed["models"]} == KINDS
