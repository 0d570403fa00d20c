"""Parity with the reference implementation: transformers CLIPModel + CLIPProcessor (PIL backend), fp32."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pickscore.scorer import Scorer
from tests.conftest import varied_images

PROMPTS = [
    "",
    "a photo of a cat wearing a tiny wizard hat",
    "A RED Cube On A Blue Sphere, 4k, trending on artstation",
    "un café crème sur une table en bois, lumière du matin",
    "東京の夜景、ネオンが光る雨の街",
    "emoji party 🎉🐱🚀 with sparkles",
    "portrait of an astronaut " * 30,  # far over 77 tokens: truncated
    "tabs\tand\nnewlines   and   spaces",
    "don't stop me now; it's 3.14 & more!",
    "Ünïcödé ß İstanbul ﬁ ligature",
    "minimalist line art of a mountain lake",
]


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.fixture(scope="module")
def reference(tiny_hf_dir, tiny_hf_model):
    """Scores from CLIPModel + CLIPProcessor for each prompt over the varied images."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor, CLIPTokenizer

    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(tiny_hf_dir),
        tokenizer=CLIPTokenizer.from_pretrained(tiny_hf_dir),
    )
    images = [rgb if rgb is not None else Image.open(io.BytesIO(data)) for _, data, rgb in varied_images()]
    with torch.no_grad():
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeds = _features(tiny_hf_model.get_image_features(pixel_values=pixel_values))
        text = processor(text=PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        text_embeds = _features(tiny_hf_model.get_text_features(**text))
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        return (tiny_hf_model.logit_scale.exp() * text_embeds @ image_embeds.T).numpy()  # (prompts, images)


def test_scores_and_ranking_match_transformers(tiny_hf_dir, reference):
    scorer = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32", batch_size=7)
    images = [data for _, data, _ in varied_images()]
    assert len(images) >= 20 and len(PROMPTS) >= 10
    ours = np.array([scorer.score(prompt, images) for prompt in PROMPTS])
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    for p, (mine, theirs) in enumerate(zip(ours, reference)):
        assert list(np.argsort(-mine)) == list(np.argsort(-theirs)), PROMPTS[p]
    # Not a degenerate comparison: images really score differently.
    assert np.ptp(reference, axis=1).min() > 1e-3


def test_rank_matches_reference_softmax(tiny_hf_dir, reference):
    scorer = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32")
    images = [data for _, data, _ in varied_images()]
    ranking = scorer.rank(PROMPTS[1], images)
    expected = torch.softmax(torch.from_numpy(reference[1]).double(), dim=0).numpy()
    np.testing.assert_allclose(ranking.probabilities, expected, atol=1e-5)
    assert ranking.order == list(np.argsort(-reference[1], kind="stable"))
