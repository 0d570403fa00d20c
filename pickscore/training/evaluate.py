"""Evaluation: tie-aware accuracy with the threshold chosen on validation_unique and applied to test_unique."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from pickscore.model.preprocess import PreprocessConfig
from pickscore.model.tokenizer import Tokenizer
from pickscore.training import metrics
from pickscore.training.data import PreferencePair, SkipCounter, iter_decoded, iter_pairs


@torch.no_grad()
def score_pairs(model: torch.nn.Module, tokenizer: Tokenizer, preprocess: PreprocessConfig, pairs: Iterable[PreferencePair],
                device: torch.device, pool: Executor, skipped: SkipCounter, batch: int = 64) -> tuple[np.ndarray, ...]:
    """Scores of both images of each decodable pair -> (s0, s1, label_0, label_1), each (N,)."""
    out: list[list[float]] = [[], [], [], []]
    decoded = iter_decoded(pairs, preprocess, skipped, pool=pool, chunk=batch)
    while good := list(itertools.islice(decoded, batch)):
        n = len(good)
        tokens = torch.from_numpy(tokenizer([p.caption for p, _, _ in good])).to(device)  # (n, 77)
        images = torch.from_numpy(np.stack([x for _, x, _ in good] + [x for _, _, x in good])).to(device)  # (2n, 3, H, W)
        text = model.encode_text(tokens, normalize=True).float()  # (n, D)
        img = model.encode_image(images, normalize=True).float()  # (2n, D)
        scale = model.logit_scale.exp().float()
        out[0] += (scale * (text * img[:n]).sum(-1)).cpu().tolist()
        out[1] += (scale * (text * img[n:]).sum(-1)).cpu().tolist()
        out[2] += [p.label_0 for p, _, _ in good]
        out[3] += [p.label_1 for p, _, _ in good]
    return tuple(np.asarray(x, dtype=np.float64) for x in out)


def split_probabilities(scorer, data: str | os.PathLike, split: str, limit: int = 0) -> tuple[np.ndarray, ...]:
    """(p0, label_0, label_1, skipped count) of a split's labeled pairs, scored by a torch-backed ``Scorer``."""
    pairs = iter_pairs(data, split=split, labeled_only=True)
    if limit:
        pairs = itertools.islice(pairs, limit)
    skipped = SkipCounter(split)
    backend = scorer.backend  # a TorchBackend: evaluation runs the torch model
    s0, s1, l0, l1 = score_pairs(backend.model, scorer.tokenizer, scorer.preprocess_config, pairs, backend.device,
                                 scorer.pool, skipped)
    return metrics.preference_probabilities(s0, s1), l0, l1, skipped.count


def evaluate(scorer, data: str | os.PathLike, limit: int = 0) -> dict[str, Any]:
    """The paper's protocol on a dataset directory -> accuracy, threshold and what they came from."""
    val = split_probabilities(scorer, data, "validation_unique", limit)
    test = split_probabilities(scorer, data, "test_unique", limit)
    result = metrics.evaluate_protocol(val[:3], test[:3])
    return {**result, "validation_pairs": len(val[0]), "test_pairs": len(test[0]),
            "skipped": int(val[3] + test[3]), "curves": {"validation": val[:3], "test": test[:3]}}


def plot_threshold_curves(results: dict[str, dict[str, Any]], png: Path) -> None:
    """Accuracy against the tie threshold on test_unique, one line per model, the chosen thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = np.linspace(0, 1, 201)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        curve = metrics.accuracy_curve(*r["curves"]["test"], thresholds)
        ax.plot(thresholds, curve, label=f"{name} ({r['accuracy']:.3f} at {r['threshold']:.3f})")
        ax.axvline(r["threshold"], linestyle=":", color=ax.lines[-1].get_color())
    ax.axhline(0.5, color="grey", linestyle="--", label="random (0.5)")
    ax.set(xlabel="tie threshold |p0 - p1|", ylabel="tie-aware accuracy (test_unique)", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
