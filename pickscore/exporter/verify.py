"""Checking an export against its source: the ONNX and TensorRT exporters both verify through this module.

    pixels, tokens = verification_inputs(preprocess, tokenizer, 64)   # rendered scenes and their captions
    rank_agreement(candidate, reference, pixels, tokens)              # fraction of best-of-8 pairs ordered alike

Inputs are drawn scenes (``pickscore.scenes``), preprocessed exactly like real requests, so a check exercises
varied colours, shapes and layouts and captions that describe them.
"""

from __future__ import annotations

import io
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

TOLERANCE = 1e-4  # largest |embedding difference| accepted for fp32 against torch


def verify_export(
    directory: Path, loaded: LoadedModel, manifest: dict[str, Any], tolerance: float, min_agreement: float
) -> dict[str, Any]:
    """ONNX Runtime against torch at batch sizes 1 and 7; rank agreement with fp32 on best-of-8 sets."""
    precision = manifest["precision"]
    ours = OnnxBackend(directory, manifest=manifest)
    reference = TorchBackend(loaded, device="cpu", dtype=torch.float32)
    pixels, tokens = verification_inputs(loaded.preprocess, loaded.tokenizer(), 8 * 8)
    result: dict[str, Any] = {}
    worst = 0.0
    for batch in (1, 7):
        worst = max(
            worst,
            float(np.abs(ours.encode_image(pixels[:batch]) - reference.encode_image(pixels[:batch])).max()),
            float(np.abs(ours.encode_text(tokens[:batch]) - reference.encode_text(tokens[:batch])).max()),
        )
    result["max_abs_diff"] = worst
    if precision == "fp32":
        if worst > tolerance:
            raise ValueError(f"ONNX Runtime differs from torch by {worst:.2e} > {tolerance:.0e}; not written")
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
    candidate: Backend, reference: Backend, pixels: np.ndarray, tokens: np.ndarray, per_set: int = 8
) -> float:
    """Fraction of image pairs, within best-of-8 sets (one prompt each), that both backends order alike."""
    agree = total = 0
    for s in range(len(pixels) // per_set):
        images = pixels[s * per_set : (s + 1) * per_set]
        a = candidate.encode_image(images) @ candidate.encode_text(tokens[s : s + 1])[0]
        b = reference.encode_image(images) @ reference.encode_text(tokens[s : s + 1])[0]
        alike, pairs = pairs_ordered_alike(a, b)
        agree, total = agree + alike, total + pairs
    return float(agree / total)


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
