"""Evaluation: tie-aware accuracy with the threshold chosen on validation_unique and applied to test_unique.

    backend = load_backend("runs/demo/best")       # or an ONNX export, fp32/fp16/int8: any backend, any kind
    evaluate(backend, "data/heldout")              # {"accuracy", "threshold", "validation_accuracy", ...}
    evaluate_refs(["demo", "runs/init"], "data/heldout", device="cpu")   # one model loaded at a time
    human_agreement("data/mine")                   # DATA/agreement.json's people row (`collect export`), or None
    ranking(results, people)                       # the paper's table: scorers, people and random, best first

Scores come from the backend's towers and its own scoring rule (``Backend.scores``: PickScore's and CLIP's
scaled cosine, HPS's cosine, the aesthetic predictor's prompt-free score, ImageReward's joint pass), as
served scores do; training's validation runs the same code on the model being trained.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import sys
from collections.abc import Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pickscore.backends import Backend, load_backend
from pickscore.datasets.pickapic import PreferencePair, iter_pairs
from pickscore.errors import InvalidInput
from pickscore.resources import usable_cores
from pickscore.training import metrics
from pickscore.training.data import SkipCounter, iter_decoded


def score_pairs(
    backend: Backend, pairs: Iterable[PreferencePair], pool: Executor, skipped: SkipCounter, batch: int = 64
) -> tuple[np.ndarray, ...]:
    """Scores of both images of each decodable pair, by the backend's own rule -> (s0, s1, label_0, label_1),
    each (N,) float64."""
    out: list[list[np.ndarray]] = [[], [], [], []]
    decoded = iter_decoded(pairs, backend.preprocess, skipped, pool=pool, chunk=batch)
    while good := list(itertools.islice(decoded, batch)):
        n = len(good)
        text = backend.encode_text(backend.tokenizer([p.caption for p, _, _ in good]))  # (n, D)
        images = backend.encode_image(np.stack([x for _, x, _ in good] + [x for _, _, x in good]))  # (2n, D)
        out[0].append(backend.scores(text, images[:n]))  # caption i with image 0 of pair i
        out[1].append(backend.scores(text, images[n:]))  # the same caption with image 1
        out[2].append(np.array([p.label_0 for p, _, _ in good]))
        out[3].append(np.array([p.label_1 for p, _, _ in good]))
    return tuple(np.concatenate(x).astype(np.float64) if x else np.zeros(0) for x in out)


def split_probabilities(
    backend: Backend, data: str | os.PathLike, split: str, pool: Executor, limit: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(p0, label_0, label_1, skipped count) of a split's labeled pairs."""
    pairs = iter_pairs(data, split=split, labeled_only=True)
    if limit:
        pairs = itertools.islice(pairs, limit)
    skipped = SkipCounter(split)
    s0, s1, l0, l1 = score_pairs(backend, pairs, pool, skipped)
    return metrics.preference_probabilities(s0, s1), l0, l1, skipped.count


def evaluate(backend: Backend, data: str | os.PathLike, limit: int = 0, workers: int | None = None) -> dict[str, Any]:
    """The paper's protocol on a dataset directory -> accuracy, threshold and what they came from.

    ``workers`` threads decode images (default one per core); ``limit`` caps the pairs per split (0: all).
    InvalidInput names the split when one has no pair to score (none labeled, or every one undecodable).
    """
    with ThreadPoolExecutor(max_workers=workers or usable_cores(), thread_name_prefix="decode") as pool:
        val = _scored_split(backend, data, "validation_unique", pool, limit, "to choose the tie threshold")
        test = _scored_split(backend, data, "test_unique", pool, limit, "to measure accuracy")
    result = metrics.evaluate_protocol(val[:3], test[:3])
    return {
        **result,
        "validation_pairs": len(val[0]),
        "test_pairs": len(test[0]),
        "skipped": int(val[3] + test[3]),
        "curves": {"validation": val[:3], "test": test[:3]},
    }


def evaluate_refs(
    refs: list[str],
    data: str | os.PathLike,
    limit: int = 0,
    backend: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, dict[str, Any]]:
    """``evaluate`` each model reference in turn (on ``load_backend``'s ``backend``, ``device``, ``dtype``) -> ref ->
    its result. One model is loaded at a time and freed before the next loads: full-size scorers take gigabytes."""
    results = {}
    for ref in refs:
        loaded = load_backend(ref, backend, device, dtype)
        try:
            results[ref] = evaluate(loaded, data, limit)
        finally:
            del loaded
            _free_memory()
    return results


def _free_memory() -> None:
    """Collect what a dropped model left (reference cycles included) and hand CUDA's cached blocks back."""
    gc.collect()
    torch = sys.modules.get("torch")  # only where a backend loaded it: an ONNX export needs no torch
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def human_agreement(data: str | os.PathLike) -> dict[str, Any] | None:
    """People's agreement with each other in ``data/agreement.json`` (written by ``pickscore collect export``), as a
    row beside the models -> {"rate", "comparisons", "pairs", "definition", "file"}, or None without that file.

    ``rate`` is the file's ``tie_aware_rate``: two people's choices for one pair scored against each other with
    eval's points (1 same, 0.5 when exactly one is a tie, 0 opposite), so it reads like a model's accuracy. It
    is None, with a ``note``, when no pair was judged by two people or the file predates that figure."""
    path = Path(data) / "agreement.json"
    if not path.is_file():
        return None
    try:
        agreed = json.loads(path.read_text())
        row = {
            "rate": agreed.get("tie_aware_rate"),
            "comparisons": int(agreed["comparisons"]),
            "pairs": int(agreed["pairs"]),
            "definition": agreed.get("definitions", {}).get("tie_aware_rate", ""),
            "file": str(path),
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidInput(f"{path}: not the agreement.json `pickscore collect export` writes ({e!r})") from None
    if row["rate"] is None:
        row["note"] = (
            "no pair was judged by two people"
            if "tie_aware_rate" in agreed
            else "it has no tie_aware_rate (written by an older `pickscore collect export`: export again)"
        )
    return row


def ranking(results: dict[str, dict[str, Any]], people: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The paper's table: each scorer, the people (when ``people`` has a rate) and random choice (0.5), best
    accuracy first; equal accuracies keep that order -> [{"name", "accuracy", "threshold", "kind"}]."""
    rows = [
        {"name": ref, "accuracy": r["accuracy"], "threshold": r["threshold"], "kind": "model"}
        for ref, r in results.items()
    ]
    if people is not None and people["rate"] is not None:
        rows.append({"name": "people", "accuracy": people["rate"], "threshold": None, "kind": "people"})
    rows.append({"name": "random", "accuracy": 0.5, "threshold": None, "kind": "random"})
    return sorted(rows, key=lambda row: -row["accuracy"])


def _scored_split(
    backend: Backend, data: str | os.PathLike, split: str, pool: Executor, limit: int, purpose: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``split_probabilities``, refusing a split with no scored pair (its accuracy would be NaN)."""
    result = split_probabilities(backend, data, split, pool, limit)
    if not len(result[0]):
        reason = f"each of its {result[3]} labeled pairs is undecodable" if result[3] else "it has no labeled pair"
        raise InvalidInput(
            f"nothing to evaluate in the {split} split of {data}: {reason}; eval needs at least one scored pair "
            f"there {purpose}"
        )
    return result


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
