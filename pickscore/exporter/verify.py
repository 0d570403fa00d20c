"""Checking an export against its source: the ONNX and TensorRT exporters both verify through this module.

    pixels, tokens = verification_inputs(preprocess, tokenizer, 64)   # rendered scenes and their captions
    rank_agreement(candidate, reference, pixels, tokens)              # fraction of best-of-8 pairs ordered alike
    agreement(set_scores(a, pixels, tokens), set_scores(b, ...))      # the same, from each one's scores once

Scores are each backend's own (``Backend.scores``: the kind's rule with the logit_scale it carries, the manifest's
for an export), so an export whose manifest scales or combines the towers differently from the model fails.
Inputs are drawn scenes (``pickscore.scenes``), preprocessed exactly like real requests, so a check exercises
varied colours, shapes and layouts and captions that describe them.
"""

from __future__ import annotations

import io
import math
import random
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pickscore.backends import Backend
from pickscore.backends.onnx_backend import OnnxBackend
from pickscore.backends.torch_backend import TorchBackend
from pickscore.model.checkpoint import LoadedModel
from pickscore.model.preprocess import PreprocessConfig, load_pixels
from pickscore.model.tokenizer import Tokenizer
from pickscore.scenes import random_scene, render

TOLERANCE = 1e-4  # largest |tower output difference| accepted for fp32 against torch; scores: times exp(logit_scale)
PER_SET, SETS = 8, 8  # the check's inputs: 8 best-of-8 sets, as the paper's best-of-N


def verify_export(
    directory: Path, loaded: LoadedModel, manifest: dict[str, Any], tolerance: float, min_agreement: float
) -> dict[str, Any]:
    """ONNX Runtime against torch at batch sizes 1 and 7, the towers' outputs and the scores they make; rank
    agreement with fp32 on best-of-8 sets."""
    precision = manifest["precision"]
    ours = OnnxBackend(directory, manifest=manifest)
    reference = TorchBackend(loaded, device="cpu", dtype=torch.float32)
    pixels, tokens = verification_inputs(loaded.preprocess, loaded.tokenizer(), SETS * PER_SET)
    worst = worst_score = 0.0
    for batch in (1, 7):
        pairs = []
        for backend in (ours, reference):
            images, text = backend.encode_image(pixels[:batch]), backend.encode_text(tokens[:batch])
            pairs.append((images, text, backend.scores(text, images)))
        (image_a, text_a, score_a), (image_b, text_b, score_b) = pairs
        worst = max(worst, float(np.abs(image_a - image_b).max()), float(np.abs(text_a - text_b).max()))
        worst_score = max(worst_score, float(np.abs(score_a - score_b).max()))
    result: dict[str, Any] = {"max_abs_diff": worst, "max_score_diff": worst_score}
    if precision == "fp32":
        score_tolerance = tolerance * max(1.0, math.exp(loaded.logit_scale))
        if worst > tolerance or worst_score > score_tolerance:
            raise ValueError(
                f"ONNX Runtime differs from torch by {worst:.2e} in the towers' outputs (accepted {tolerance:.0e}) "
                f"and {worst_score:.2e} in scores (accepted {score_tolerance:.0e}); not written"
            )
        return result
    agreement = rank_agreement(ours, reference, pixels, tokens)
    result["rank_agreement"] = agreement
    if agreement < min_agreement:
        raise ValueError(
            f"{precision} export agrees with fp32 on {agreement:.3f} of best-of-8 pairs, below "
            f"--min-agreement {min_agreement}; not written"
        )
    return result


def rank_agreement(
    candidate: Backend, reference: Backend, pixels: np.ndarray, tokens: np.ndarray, per_set: int = PER_SET
) -> float:
    """Fraction of image pairs, within best-of-8 sets (one prompt each), that both backends' scores order alike."""
    return agreement(set_scores(candidate, pixels, tokens, per_set), set_scores(reference, pixels, tokens, per_set))


def set_scores(backend: Backend, pixels: np.ndarray, tokens: np.ndarray, per_set: int = PER_SET) -> list[np.ndarray]:
    """The scores of each best-of-``per_set`` set: set s is ``pixels[s * per_set : (s + 1) * per_set]`` against the
    prompt ``tokens[s]``."""
    out = []
    for s in range(len(pixels) // per_set):
        images, text = pixels[s * per_set : (s + 1) * per_set], tokens[s : s + 1]
        out.append(backend.scores(backend.encode_text(text), backend.encode_image(images)))
    return out


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Fraction of the pairs within sets that two lists of ``set_scores`` order alike."""
    counts = [pairs_ordered_alike(x, y) for x, y in zip(a, b)]
    return sum(alike for alike, _ in counts) / sum(pairs for _, pairs in counts)


def pairs_ordered_alike(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(pairs of candidates that two score vectors of one set order alike, pairs in all)."""
    alike = sum(int((a[i] > a[j]) == (b[i] > b[j])) for i, j in combinations(range(len(a)), 2))
    return alike, len(a) * (len(a) - 1) // 2


def verification_inputs(
    preprocess: PreprocessConfig, tokenizer: Tokenizer, n: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered scenes as pixels (n, 3, H, W) and their captions as tokens (n, 77)."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    pixels = []
    for scene in scenes:
        buf = io.BytesIO()
        render(scene, 256, rng).save(buf, "PNG")
        pixels.append(load_pixels(buf.getvalue(), preprocess))
    return np.stack(pixels), tokenizer([s.caption for s in scenes])
