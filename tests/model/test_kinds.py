"""HPS v2 and the LAION aesthetic predictor, loaded from their published layouts, against their authors' scoring code
(transcribed below, each named as such) running on open_clip, the package both score with."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pickscore.backends import load_backend
from pickscore.errors import ModelLoadError
from pickscore.model.checkpoint import resolve
from pickscore.scorer import Scorer
from tests.conftest import varied_images
from tests.model.kind_layouts import TINY_OPEN_CLIP, aesthetic_head, open_clip_model, write_aesthetic, write_hps

PROMPTS = ["a cat in a hat", "an astronaut riding a horse, oil painting", "Ünïcode — and punctuation!?"]


def _reference_inputs():
    """(bytes, the picture the reference opens) for every image: 16-bit ones as this package reads them."""
    return [(data, rgb if rgb is not None else Image.open(io.BytesIO(data))) for _, data, rgb in varied_images(3)]


def hps_reference_scores(directory, prompt: str, pictures: list) -> np.ndarray:
    """A transcription of HPSv2's ``score.py`` (``hpsv2.score``): open_clip's model and transform, the checkpoint's
    ``state_dict``, ``image_features @ text_features.T``, its diagonal; one image per call, as there."""
    model, preprocess_val, tokenizer = open_clip_model("hps-reference", TINY_OPEN_CLIP, 99, directory.parent)
    checkpoint = torch.load(directory / "HPS_v2_compressed.pt", map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])
    out = []
    for picture in pictures:
        with torch.no_grad():
            image = preprocess_val(picture).unsqueeze(0)
            text = tokenizer([prompt])
            outputs = model(image, text)
            image_features, text_features = outputs["image_features"], outputs["text_features"]
            logits_per_image = image_features @ text_features.T
            out.append(torch.diagonal(logits_per_image).cpu().numpy()[0])
    return np.array(out)


def aesthetic_reference_scores(directory, pictures: list) -> np.ndarray:
    """A transcription of improved-aesthetic-predictor's ``simple_inference.py``: the MLP's state dict, CLIP's
    ``encode_image`` on its ``preprocess``, numpy's L2 normalisation, the MLP (``clip.load`` is open_clip here)."""

    def normalized(a, axis=-1, order=2):
        l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
        l2[l2 == 0] = 1
        return a / np.expand_dims(l2, axis)

    class MLP(torch.nn.Module):
        def __init__(self, input_size):
            super().__init__()
            self.layers = aesthetic_head(input_size, 0)

        def forward(self, x):
            return self.layers(x)

    model = MLP(TINY_OPEN_CLIP["embed_dim"])
    model.load_state_dict(torch.load(directory / "sac+logos+ava1-l14-linearMSE.pth"))
    model.eval()
    cfg = {**TINY_OPEN_CLIP, "quick_gelu": True}
    model2, preprocess, _ = open_clip_model("aesthetic-reference", cfg, 99, directory.parent)
    model2.load_state_dict(torch.load(directory / "clip" / "open_clip_pytorch_model.bin"))
    out = []
    for picture in pictures:
        image = preprocess(picture).unsqueeze(0)
        with torch.no_grad():
            image_features = model2.encode_image(image)
        im_emb_arr = normalized(image_features.cpu().detach().numpy())
        prediction = model(torch.from_numpy(im_emb_arr).type(torch.FloatTensor))
        out.append(float(prediction[0, 0].detach()))
    return np.array(out)


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    return write_hps(tmp_path_factory.mktemp("hps") / "HPSv2", seed=1)


@pytest.fixture(scope="module")
def aesthetic_dir(tmp_path_factory):
    return write_aesthetic(tmp_path_factory.mktemp("aesthetic") / "laion-aesthetic", seed=2)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_hps_equals_its_reference_score(hps_dir, prompt):
    inputs = _reference_inputs()
    scorer = Scorer(load_backend(str(hps_dir)))
    assert scorer.backend.kind == "hps" and scorer.backend.logit_scale == 0.0
    ours = np.array(scorer.score(prompt, [data for data, _ in inputs]))
    reference = hps_reference_scores(hps_dir, prompt, [picture for _, picture in inputs])
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    assert np.all(np.abs(ours) <= 1 + 1e-5)  # a cosine


def test_hps_loads_from_its_file_and_refuses_a_directory_of_both(hps_dir, tmp_path):
    file = hps_dir / "HPS_v2_compressed.pt"
    assert resolve(file).kind == "hps"
    both = write_hps(tmp_path / "both", seed=1)
    (both / "HPS_v2.1_compressed.pt").write_bytes(file.read_bytes())
    with pytest.raises(ModelLoadError, match=r"HPS_v2\.1_compressed\.pt and HPS_v2_compressed\.pt; pass the file"):
        resolve(both)


def test_aesthetic_equals_its_reference_and_ignores_the_prompt(aesthetic_dir):
    inputs = _reference_inputs()
    scorer = Scorer(load_backend(str(aesthetic_dir)))
    assert scorer.backend.kind == "aesthetic"
    data = [data for data, _ in inputs]
    ours = np.array(scorer.score(PROMPTS[0], data))
    reference = aesthetic_reference_scores(aesthetic_dir, [picture for _, picture in inputs])
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.array(scorer.score(PROMPTS[1], data)), ours)
    assert np.ptp(ours) > 0  # the images score differently: the comparison is not of constants


def test_aesthetic_without_its_clip_or_with_the_wrong_one_says_what_it_needs(aesthetic_dir, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    pth = alone / "sac+logos+ava1-l14-linearMSE.pth"
    pth.write_bytes((aesthetic_dir / "sac+logos+ava1-l14-linearMSE.pth").read_bytes())
    with pytest.raises(ModelLoadError, match="openai/clip-vit-large-patch14"):
        resolve(alone)
    torch.save({f"layers.{k}": v for k, v in aesthetic_head(768, 0).state_dict().items()}, pth)
    (alone / "clip").symlink_to(aesthetic_dir / "clip")
    with pytest.raises(ModelLoadError, match="takes 768-dimensional embeddings; the CLIP in .* makes 32"):
        resolve(pth)


def test_an_unknown_file_names_every_layout(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="HPS v2 .*aesthetic predictor.*ImageReward"):
        resolve(tmp_path / "weights.pt")
