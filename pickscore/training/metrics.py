"""Tie-aware preference accuracy and the Pick-a-Pic evaluation protocol.

A model predicts a tie when its two probabilities are close, |p0 - p1| <= threshold, and otherwise the image
with the higher probability. Each example scores 1 when the prediction equals the label (a tie for a tie, or
the right winner), 0.5 when exactly one of prediction and label is a tie, 0 for the wrong winner. The
threshold is chosen on validation_unique and applied to test_unique (the paper's protocol; the original
script is yuvalkirstain/PickScore, trainer/scripts/eval_preference_predictor.py).

Arrays are 1-D of length N: p0 the predicted probability of image 0, label_0/label_1 the human labels.
"""

from __future__ import annotations

import numpy as np


def preference_probabilities(s0: np.ndarray, s1: np.ndarray) -> np.ndarray:
    """Scores of image 0 and image 1 (N,) -> p0 = softmax([s0, s1])[0] (N,), float64; p1 is 1 - p0."""
    diff = np.asarray(s1, dtype=np.float64) - np.asarray(s0, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, diff))  # 1 / (1 + exp(s1 - s0)) without overflow


def _points(p0: np.ndarray, label_0: np.ndarray, label_1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example: the gap |p0 - p1|, the points if a tie is predicted, the points if the winner is predicted."""
    p0, label_0, label_1 = (np.asarray(a, dtype=np.float64) for a in (p0, label_0, label_1))
    gap = np.abs(2.0 * p0 - 1.0)  # |p0 - p1|
    tie = label_0 == label_1
    right_winner = np.where(label_0 > label_1, p0 > 0.5, p0 < 0.5)
    return gap, np.where(tie, 1.0, 0.5), np.where(tie, 0.5, right_winner.astype(np.float64))


def accuracy_curve(p0: np.ndarray, label_0: np.ndarray, label_1: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Tie-aware accuracy at each of T thresholds (T,) -> (T,), e.g. to plot accuracy against the threshold."""
    gap, tie_points, winner_points = _points(p0, label_0, label_1)
    predicted_tie = gap[None, :] <= np.asarray(thresholds, dtype=np.float64)[:, None]  # (T, N)
    return np.where(predicted_tie, tie_points, winner_points).mean(axis=1)


def tie_aware_accuracy(p0: np.ndarray, label_0: np.ndarray, label_1: np.ndarray, threshold: float) -> float:
    """Mean points over the N examples at one threshold; threshold 0 predicts a tie only when p0 == p1 exactly."""
    return float(accuracy_curve(p0, label_0, label_1, np.array([threshold]))[0])


def best_threshold(
    p0: np.ndarray, label_0: np.ndarray, label_1: np.ndarray, candidates: np.ndarray | None = None
) -> tuple[float, float]:
    """The threshold in [0, 1) with the highest accuracy, and that accuracy; equal accuracies go to the smaller.

    Accuracy only changes where the threshold crosses an observed gap |p0 - p1|, so the default candidates (a
    0.001 grid plus every observed gap below 1) always contain an optimum.
    """
    if candidates is None:
        gap = _points(p0, label_0, label_1)[0]
        candidates = np.concatenate([np.arange(1000) / 1000, gap[gap < 1.0]])
    candidates = np.unique(np.asarray(candidates, dtype=np.float64))  # sorted, so argmax's first hit is the smallest
    accuracies = accuracy_curve(p0, label_0, label_1, candidates)
    best = int(np.argmax(accuracies))
    return float(candidates[best]), float(accuracies[best])


def evaluate_protocol(
    validation: tuple[np.ndarray, np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> dict[str, float]:
    """(p0, label_0, label_1) of validation_unique and of test_unique -> the threshold picked on validation,
    the validation accuracy there, and the test accuracy at that threshold (the number to report)."""
    threshold, validation_accuracy = best_threshold(*validation)
    return {
        "threshold": threshold,
        "validation_accuracy": validation_accuracy,
        "accuracy": tie_aware_accuracy(*test, threshold),
    }
