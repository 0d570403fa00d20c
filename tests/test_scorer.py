from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pickscore.backends.torch_backend import resolve_device
from pickscore.errors import InvalidInput
from pickscore.model.scoring import rank_scores
from pickscore.scorer import Scorer
from tests.conftest import varied_images

IMAGES = [data for _, data, _ in varied_images()]
PROMPT = "a lighthouse at dusk"


@pytest.fixture(scope="module")
def scorer(tiny_hf_dir):
    return Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32", batch_size=4)


def test_inputs_as_bytes_paths_and_pil_agree(scorer, image_dir):
    names = [n for n, _, _ in varied_images()[:5]]
    from_bytes = scorer.score(PROMPT, IMAGES[:5])
    from_paths = scorer.score(PROMPT, [image_dir / n for n in names])
    from_pil = scorer.score(PROMPT, [Image.open(image_dir / n) for n in names])
    np.testing.assert_allclose(from_paths, from_bytes, atol=1e-6)
    np.testing.assert_allclose(from_pil, from_bytes, atol=1e-6)


def test_batch_size_and_chunking_do_not_change_scores(tiny_hf_dir, scorer):
    single = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="fp32", batch_size=1)
    many = IMAGES * 4  # 100 images: more than one 64-image chunk
    np.testing.assert_allclose(single.score(PROMPT, many), scorer.score(PROMPT, many), atol=1e-5)


def test_rank_orders_best_first_with_probabilities(scorer):
    scores = np.array(scorer.score(PROMPT, IMAGES))
    ranking = scorer.rank(PROMPT, IMAGES, top_k=3)
    assert ranking.order == list(np.argsort(-scores)[:3])
    assert scores[ranking.order[0]] == scores.max()
    assert abs(sum(ranking.probabilities) - 1) < 1e-5 and len(ranking.probabilities) == len(IMAGES)
    assert ranking.probabilities[ranking.order[0]] == max(ranking.probabilities)
    with pytest.raises(InvalidInput, match="top_k"):
        scorer.rank(PROMPT, IMAGES, top_k=0)


def test_ties_keep_input_order():
    assert rank_scores(np.array([1.0, 2.0, 2.0, 0.5], np.float32)).order == [1, 2, 0, 3]


def test_bad_image_is_named_and_skip_invalid_scores_the_rest(scorer, bad_images):
    items = [IMAGES[0], bad_images["truncated.jpg"], IMAGES[1]]
    with pytest.raises(InvalidInput, match=r"image 1 \(.*truncated.jpg\): not a decodable image"):
        scorer.score(PROMPT, items)
    scores, errors = scorer.score_all(PROMPT, items, skip_invalid=True)
    assert list(errors) == [1] and np.isnan(scores[1])
    np.testing.assert_allclose(scores[[0, 2]], scorer.score(PROMPT, [IMAGES[0], IMAGES[1]]), atol=1e-6)
    with pytest.raises(InvalidInput, match="image 0: empty file"):
        scorer.score(PROMPT, [b""])
    with pytest.raises(InvalidInput, match="no images"):
        scorer.score(PROMPT, [])


def test_reduced_precision_path_runs_and_stays_close(tiny_hf_dir, scorer):
    # bf16 is what CUDA uses by default; on CPU it exercises the same casting code.
    bf16 = Scorer.from_pretrained(tiny_hf_dir, device="cpu", dtype="bf16")
    assert bf16.backend.model.visual.conv1.weight.dtype == torch.bfloat16
    low, full = np.array(bf16.score(PROMPT, IMAGES)), np.array(scorer.score(PROMPT, IMAGES))
    assert bf16.logit_scale == scorer.logit_scale  # the temperature stays fp32
    assert np.corrcoef(low, full)[0, 1] > 0.98 and np.abs(low - full).max() < 0.25


def test_device_resolution():
    assert resolve_device("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "fp16") == (torch.device("cpu"), torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        resolve_device("cpu", "int4")
