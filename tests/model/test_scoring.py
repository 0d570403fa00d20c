"""A group's places and probabilities (model.scoring.ranks, softmax), as batch jobs and the reward client use them."""

from __future__ import annotations

import numpy as np

from pickscore.model.scoring import ranks, softmax


def test_ranks_are_places_in_input_order_with_ties_by_input_order():
    assert ranks(np.array([1.0, 2.0, 2.0, 0.5], np.float32)).tolist() == [3, 1, 2, 4]
    assert ranks(np.array([], np.float32)).tolist() == []


def test_softmax_is_the_preference_probability_over_the_group():
    probabilities = softmax(np.array([21.0, 20.0, 23.0]))
    assert probabilities.dtype == np.float32 and abs(probabilities.sum() - 1) < 1e-6
    assert ranks(probabilities).tolist() == [2, 3, 1]
