"""ONNX exports of the dual-encoder kinds beside PickScore/CLIP: tiny HPS v2 and LAION aesthetic-predictor models in
their published layouts, exported and loaded back as a model reference (a real onnxruntime session), score as the
torch backend does on real images, through the manifest's kind and effective logit_scale; the Triton repository
built on an export scores alike; ImageReward, whose score is a joint forward pass, is refused with the reason."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format

from pickscore.backends import load_backend
from pickscore.cli import main
from pickscore.exporter.onnx import export_onnx
from pickscore.exporter.triton import export_triton
from pickscore.model.checkpoint import resolve
from pickscore.model.preprocess import PreprocessConfig
from pickscore.scorer import Scorer
from tests.conftest import varied_images
from tests.exporter.test_onnx import read_config
from tests.model.image_reward_layout import write_image_reward
from tests.model.kind_layouts import write_aesthetic, write_hps

KINDS = ("hps", "aesthetic")
IMAGES = [data for _, data, _ in varied_images(1)]
PROMPTS = ["a cat in a hat", "an astronaut riding a horse, oil painting", "Ünïcode — and punctuation!?", ""]
JOINT_REFUSED = r"image_reward model: its score is a joint forward pass over each \(prompt, image\) pair"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {"hps": write_hps(root / "hps", seed=11), "aesthetic": write_aesthetic(root / "aesthetic", seed=12)}


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    for kind, directory in models.items():
        export_onnx(str(directory), root / kind)
    return {kind: root / kind for kind in models}


@pytest.fixture(scope="module")
def torch_scores(models) -> dict[str, np.ndarray]:
    """Each kind's scores (prompt x image) from the torch backend on the published layout, fp32."""
    out = {}
    for kind, directory in models.items():
        scorer = Scorer(load_backend(str(directory), device="cpu", dtype="fp32"))
        out[kind] = np.array([scorer.score(prompt, IMAGES) for prompt in PROMPTS])
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_the_export_scores_as_the_torch_backend(kind, exports, torch_scores):
    scorer = Scorer(load_backend(str(exports[kind])))
    assert (scorer.backend.name, scorer.backend.kind, scorer.backend.logit_scale) == ("onnxruntime", kind, 0.0)
    got = np.array([scorer.score(prompt, IMAGES) for prompt in PROMPTS])
    np.testing.assert_allclose(got, torch_scores[kind], atol=1e-4)
    if kind == "hps":  # the plain cosine: the tiny weights' own logit_scale (2.0) would scale it by e^2
        assert np.abs(got).max() <= 1.0 and np.abs(got).max() > 0.05
        assert len({tuple(row) for row in got.round(4)}) == len(PROMPTS)  # the prompt matters
    else:  # the aesthetic predictor ignores the prompt
        assert all(np.array_equal(row, got[0]) for row in got)


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_and_preprocessing_follow_the_kind(kind, models, exports):
    loaded = resolve(models[kind])
    manifest = json.loads((exports[kind] / "pickscore_onnx.json").read_text())
    assert (manifest["kind"], manifest["logit_scale"]) == (kind, 0.0)
    assert manifest["embed_dim"] == (1 if kind == "aesthetic" else 32)
    assert manifest["verification"]["max_score_diff"] < 1e-4
    written = PreprocessConfig.from_hf(json.loads((exports[kind] / "preprocessor_config.json").read_text()))
    assert written == loaded.preprocess and written.style == "torchvision"
    image = ort.InferenceSession(str(exports[kind] / "image.onnx"), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).normal(size=(3, 3, 224, 224)).astype(np.float32)
    norms = np.linalg.norm(image.run(None, {"pixel_values": pixels})[0], axis=1)
    if kind == "hps":
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # unit embeddings
    else:
        assert not np.allclose(norms, 1.0)  # the score itself, not normalised


def test_an_int8_aesthetic_export_keeps_the_order_and_ignores_the_prompt(models, torch_scores, tmp_path):
    manifest = export_onnx(str(models["aesthetic"]), tmp_path / "int8", precision="int8", min_agreement=0.9)
    assert manifest["kind"] == "aesthetic" and manifest["verification"]["rank_agreement"] >= 0.9
    scorer = Scorer(load_backend(str(tmp_path / "int8")))
    assert scorer.backend.description.endswith("int8")
    got = np.array([scorer.score(prompt, IMAGES) for prompt in PROMPTS[:2]])
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_allclose(got[0], torch_scores["aesthetic"][0], atol=5e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_the_triton_repository_scores_as_the_torch_backend(kind, exports, torch_scores, tmp_path, monkeypatch):
    """The repository's own steps and graphs, run in the ensemble's order: the preprocessing step (model.py), the two
    ONNX towers, the score step (model.py) with its config's logit_scale. Triton itself is not installed here: its
    Python-backend module is stood in for by the few calls the steps make."""
    repo = export_triton(str(exports[kind]), tmp_path / "repo")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _python_backend_module())
    preprocess, score = (_step(repo, name) for name in ("pickscore_preprocess", "pickscore_score"))
    towers = {
        name: ort.InferenceSession(
            str(repo / f"pickscore_{name}" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        for name in ("image", "text")
    }
    for p, prompt in enumerate(PROMPTS):
        request = _Request(PROMPT=np.array([[prompt.encode()]], object), IMAGE=np.array([[b] for b in IMAGES], object))
        (prepared,) = preprocess.execute([request])
        assert prepared.error is None, prepared.error
        ids, pixels = (prepared.tensors[name] for name in ("input_ids", "pixel_values"))
        embeds = {
            "text_embeds": towers["text"].run(None, {"input_ids": ids})[0],
            "image_embeds": towers["image"].run(None, {"pixel_values": pixels})[0],
        }
        (scored,) = score.execute([_Request(**embeds)])
        np.testing.assert_allclose(scored.tensors["SCORE"][:, 0], torch_scores[kind][p], atol=1e-4)


def test_image_reward_is_refused_with_the_reason(tmp_path, capsys):
    model = write_image_reward(tmp_path / "imagereward", seed=3)
    for export in (
        lambda: export_onnx(str(model), tmp_path / "onnx"),
        lambda: export_triton(str(model), tmp_path / "r"),
    ):
        with pytest.raises(ValueError, match=JOINT_REFUSED + r".*serve it with the torch backend"):
            export()
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "r").exists()
    assert main(["export", "onnx", "--model", str(model), "--out", str(tmp_path / "cli")]) == 1
    assert "meet in a dot product" in capsys.readouterr().err


class _Request:
    """A request of named input tensors (what Triton hands a Python model's execute)."""

    def __init__(self, **tensors: np.ndarray):
        self.tensors = tensors


class _Response:
    def __init__(self, output_tensors=(), error=None):
        self.tensors = {t.name: t.array for t in output_tensors}
        self.error = error


def _python_backend_module() -> types.ModuleType:
    """triton_python_backend_utils as far as the repository's steps use it."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = lambda name, array: types.SimpleNamespace(name=name, array=np.asarray(array))
    module.InferenceResponse = _Response
    module.TritonError = str
    module.get_input_tensor_by_name = lambda request, name: types.SimpleNamespace(
        as_numpy=lambda: request.tensors[name]
    )
    return module


def _step(repo, name: str):
    """A Python-backend step of ``repo`` initialised as Triton does: model.py's TritonPythonModel, its config as
    JSON."""
    spec = importlib.util.spec_from_file_location(f"_triton_{name}", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    step = module.TritonPythonModel()
    config = json_format.MessageToJson(read_config(repo / name / "config.pbtxt"), preserving_proto_field_name=True)
    step.initialize({"model_config": config})
    return step
