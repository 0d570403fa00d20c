"""A full-size, randomly initialised PickScore_v1-shaped (CLIP-H) transformers checkpoint converts exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pickscore.backends.torch_backend import TorchBackend
from pickscore.model import hf_convert
from pickscore.model.checkpoint import resolve
from pickscore.model.preprocess import normalize
from pickscore.scorer import Scorer
from tests.conftest import save_hf_clip, varied_images

# PickScore_v1's config.json (laion/CLIP-ViT-H-14-laion2B-s32B-b79K architecture).
PICKSCORE_V1_CONFIG = {
    "projection_dim": 1024,
    "text_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "hidden_act": "gelu",
        "vocab_size": 49408,
        "max_position_embeddings": 77,
    },
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
    },
}


@pytest.mark.slow
def test_clip_h_converts_without_missing_or_unexpected_keys(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    hf = CLIPModel(CLIPConfig(**PICKSCORE_V1_CONFIG)).eval()
    n_params = sum(p.numel() for p in hf.parameters())
    assert 980e6 < n_params < 990e6, n_params  # 986 M, as PickScore_v1
    save_hf_clip(hf, tmp_path)

    # Every converted tensor lands on a tensor of the open_clip architecture, and vice versa (strict load).
    loaded = resolve(tmp_path)
    assert sum(p.numel() for p in loaded.model.parameters()) == n_params
    assert loaded.model_cfg == hf_convert.model_config(hf.config.to_dict())
    assert loaded.model_cfg["vision_cfg"]["width"] == 1280 and loaded.model_cfg["text_cfg"]["layers"] == 24

    scorer = Scorer(TorchBackend(loaded, device="cpu", dtype=torch.float32))
    _, data, _ = varied_images()[0]
    crops = scorer.load_image(0, data)[None]  # (1, 224, 224, 3) uint8
    pixels = normalize(crops, loaded.preprocess)  # (1, 3, 224, 224) float32, as CLIPProcessor makes them
    prompt = "a photo of an astronaut riding a horse"
    ours_image = scorer.encode_pixels(crops)[0]
    ours_text = scorer.encode_text([prompt])[0]
    with torch.no_grad():
        ref_image = hf.get_image_features(pixel_values=torch.from_numpy(pixels))
        ref_text = hf.get_text_features(input_ids=torch.from_numpy(scorer.tokenizer([prompt])))
    ref_image = getattr(ref_image, "pooler_output", ref_image)[0]
    ref_text = getattr(ref_text, "pooler_output", ref_text)[0]
    np.testing.assert_allclose(ours_image, (ref_image / ref_image.norm()).numpy(), atol=1e-4)
    np.testing.assert_allclose(ours_text, (ref_text / ref_text.norm()).numpy(), atol=1e-4)
