"""Tie-aware accuracy: every scoring rule by hand, threshold selection, and the validation -> test protocol."""

from __future__ import annotations

import numpy as np
import pytest

from pickscore.training.metrics import (
    accuracy_curve,
    best_threshold,
    evaluate_protocol,
    preference_probabilities,
    tie_aware_accuracy,
)

WIN_0, WIN_1, TIE = (1.0, 0.0), (0.0, 1.0), (0.5, 0.5)


def _labels(*labels):
    return np.array([x[0] for x in labels]), np.array([x[1] for x in labels])


def test_preference_probabilities_is_a_two_way_softmax():
    s0, s1 = np.array([2.0, 0.0, -1.0, 1000.0]), np.array([1.0, 0.0, 3.0, -1000.0])
    expected = [np.exp(2) / (np.exp(2) + np.exp(1)), 0.5, np.exp(-1) / (np.exp(-1) + np.exp(3)), 1.0]
    np.testing.assert_allclose(preference_probabilities(s0, s1), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "p0, label, points",
    [
        (0.9, WIN_0, 1.0),  # right winner
        (0.1, WIN_1, 1.0),  # right winner, image 1
        (0.1, WIN_0, 0.0),  # wrong winner
        (0.9, WIN_1, 0.0),  # wrong winner, image 1
        (0.55, TIE, 1.0),  # predicted tie, real tie
        (0.45, WIN_0, 0.5),  # predicted tie, real winner
        (0.55, WIN_1, 0.5),  # predicted tie, real winner
        (0.9, TIE, 0.5),  # predicted winner, real tie
        (0.1, TIE, 0.5),  # predicted winner, real tie
    ],
)
def test_scoring_rules(p0, label, points):
    assert tie_aware_accuracy(np.array([p0]), *_labels(label), threshold=0.2) == points


def test_accuracy_is_the_mean_of_the_points():
    p0 = np.array([0.9, 0.1, 0.55, 0.9])
    assert tie_aware_accuracy(p0, *_labels(WIN_0, WIN_0, TIE, TIE), threshold=0.2) == (1 + 0 + 1 + 0.5) / 4


def test_threshold_zero_predicts_a_tie_only_on_exact_equality():
    p0 = np.array([0.5, 0.5 + 1e-12, 0.5 - 1e-12])
    l0, l1 = _labels(TIE, TIE, TIE)
    assert tie_aware_accuracy(p0, l0, l1, threshold=0.0) == (1 + 0.5 + 0.5) / 3
    assert tie_aware_accuracy(p0, *_labels(WIN_0, WIN_0, WIN_1), threshold=0.0) == (0.5 + 1 + 1) / 3


def test_the_threshold_is_inclusive():
    # |p0 - p1| = |2 * 0.75 - 1| = 0.5 exactly in binary floating point.
    assert tie_aware_accuracy(np.array([0.75]), *_labels(TIE), threshold=0.5) == 1.0
    assert tie_aware_accuracy(np.array([0.75]), *_labels(TIE), threshold=0.4999) == 0.5


def test_accuracy_curve_steps_at_the_observed_gaps():
    p0 = np.array([0.75, 0.625, 0.5])  # gaps 0.5, 0.25, 0
    l0, l1 = _labels(WIN_0, TIE, TIE)
    curve = accuracy_curve(p0, l0, l1, np.array([0.0, 0.2, 0.25, 0.4, 0.5, 0.9]))
    np.testing.assert_array_equal(curve, np.array([1 + 0.5 + 1, 1 + 0.5 + 1, 1 + 1 + 1, 3, 0.5 + 1 + 1, 2.5]) / 3)


def test_best_threshold_finds_the_optimum_and_prefers_the_smaller():
    # Confident examples are right winners, the unsure ones (gap <= 0.25) are real ties: the optimum predicts
    # ties for exactly those, which first happens at the largest unsure gap, 0.25.
    p0 = np.array([0.95, 0.1, 0.875, 0.625, 0.45, 0.5])
    l0, l1 = _labels(WIN_0, WIN_1, WIN_0, TIE, TIE, TIE)
    threshold, accuracy = best_threshold(p0, l0, l1)
    assert (threshold, accuracy) == (0.25, 1.0)
    grid = np.linspace(0, 0.99, 100)
    assert accuracy == accuracy_curve(p0, l0, l1, grid).max()
    assert best_threshold(p0, l0, l1, candidates=np.array([0.6, 0.3, 0.0])) == (0.3, 1.0)


def test_best_threshold_stays_below_one():
    # All ties: predicting a tie everywhere is optimal; the search stays in [0, 1) and takes the smallest such.
    p0 = np.array([0.9, 0.2])
    threshold, accuracy = best_threshold(p0, *_labels(TIE, TIE))
    assert (threshold, accuracy) == (pytest.approx(0.8), 1.0)
    assert threshold < 1.0


def test_evaluate_protocol_applies_the_validation_threshold_to_test():
    validation = (np.array([0.95, 0.625, 0.45, 0.1]), *_labels(WIN_0, TIE, TIE, WIN_1))  # best threshold 0.25
    test = (np.array([0.6, 0.7, 0.2]), *_labels(TIE, TIE, WIN_1))  # gaps 0.2, 0.4, 0.6
    result = evaluate_protocol(validation, test)
    assert result == {"threshold": 0.25, "validation_accuracy": 1.0, "accuracy": (1 + 0.5 + 1) / 3}
    # On test alone a larger threshold would score higher; the protocol does not look at it.
    assert best_threshold(*test)[1] == 1.0
