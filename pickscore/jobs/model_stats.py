"""The statistics of ``pickscore evaluate-models``, pure numpy functions of the models' per-prompt image scores
(Kirstain et al. 2023, sections 4-5); the tests call them directly.

- ``mean_scores``: a model's mean image score per prompt, averaged over prompts (each prompt weighs the same),
  with a percentile ``bootstrap`` interval that resamples prompts (one resample serves every model: paired).
- ``win_rates``: per prompt, model A beats B when A's best image scores higher than B's best (ties count half);
  W[a, b] is the fraction of prompts A wins, so W[a, b] + W[b, a] = 1.
- ``elo``: Bradley-Terry ratings fitted by maximum likelihood (Newton's method) to those per-prompt games, on
  the Elo scale (400 points: 10:1 odds; mean rating 1000). One virtual tie per pair of models keeps a model that
  wins every game finite. Deterministic; its interval resamples prompts like the mean's.
- ``best_of_n``: the expected score of the best of N images drawn without replacement from a prompt's images,
  computed exactly from the sorted scores (no sampling), against one random image (N = 1, the mean): what
  choosing the best of N with PickScore buys (section 5).

``summarize`` gives them all for the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LEVEL = 0.95  # of every interval
ELO_SCALE, ELO_BASE = 400.0, 1000.0
ELO_PRIOR = 0.5  # points each way of the one virtual tie added to every pair of models that played
ELO_METHOD = (
    "Bradley-Terry maximum likelihood (Newton's method) on per-prompt games, ties half a win, one virtual tie "
    "per pair of models; Elo scale 400, mean 1000"
)
BEST_OF_METHOD = "exact expectation over draws without replacement from each prompt's sorted scores"


def best_scores(scores_by_model: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
    """(models, prompts): each model's best image score per prompt; NaN where it has none."""
    return np.array([[max(s) if len(s) else np.nan for s in prompts] for prompts in scores_by_model], np.float64)


def mean_scores(scores_by_model: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
    """(models, prompts): each model's mean image score per prompt; NaN where it has none."""
    return np.array([[np.mean(s) if len(s) else np.nan for s in prompts] for prompts in scores_by_model], np.float64)


def outcomes(best: np.ndarray) -> np.ndarray:
    """(prompts, models, models): 1 where the row model's best beats the column's, 0.5 a tie, 0 a loss.

    NaN where either has no score for the prompt, and on the diagonal (a model does not play itself).
    """
    best = np.asarray(best, np.float64)
    a, b = best.T[:, :, None], best.T[:, None, :]  # (P, M, 1), (P, 1, M)
    out = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    out[np.isnan(a) | np.isnan(b)] = np.nan
    out[:, np.arange(best.shape[0]), np.arange(best.shape[0])] = np.nan
    return out


def win_rates(best: np.ndarray) -> np.ndarray:
    """(models, models): W[a, b], the fraction of prompts where a's best image beats b's best, ties half.

    ``best`` is (models, prompts), e.g. from ``best_scores``; only prompts both models have count. W[a, b] +
    W[b, a] = 1; the diagonal is 0.5; NaN for a pair with no prompt in common.
    """
    games = outcomes(best)
    played = (~np.isnan(games)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.nansum(games, axis=0) / played
    np.fill_diagonal(rates, 0.5)
    return rates


def points(games: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(models, models): P[a, b], the points a scored against b over the prompts of ``outcomes``, each prompt
    counted ``weights[p]`` times (a bootstrap resample) or once."""
    won = np.nan_to_num(games, nan=0.0)
    return np.tensordot(np.ones(len(won)) if weights is None else weights, won, axes=1)


def elo(pts: np.ndarray, scale: float = ELO_SCALE, base: float = ELO_BASE, prior: float = ELO_PRIOR) -> np.ndarray:
    """Elo ratings (models,) fitted by maximum likelihood to the points matrix ``pts`` (``points``).

    Bradley-Terry: P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / scale)); a tie is half a win to each side.
    ``prior`` points each way (one virtual tie) are added to every pair that played, so a model that wins every
    game gets a finite, highest rating. Ratings average ``base``; NaN for a model that played no game.
    """
    pts = np.asarray(pts, np.float64)
    games = pts + pts.T
    np.fill_diagonal(games, 0.0)
    played = games > 0
    won = np.where(played, pts + prior, 0.0)
    n = won + won.T
    theta = np.zeros(len(pts))

    def log_likelihood(t: np.ndarray) -> float:
        return float(-(won * np.logaddexp(0.0, t[None, :] - t[:, None])).sum())  # sum w_ab log sigmoid(t_a - t_b)

    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # p[a, b] = P(a beats b)
        gradient = (won - n * p).sum(axis=1)
        curvature = n * p * (1 - p)
        laplacian = np.diag(curvature.sum(axis=1)) - curvature  # minus the Hessian; ones span its null space
        step = np.linalg.lstsq(laplacian, gradient, rcond=None)[0]
        size, before = 1.0, log_likelihood(theta)
        while log_likelihood(theta + size * step) < before - 1e-12 and size > 1e-6:
            size /= 2  # the likelihood is concave: a shorter step always gains
        theta = theta + size * step
        if np.max(np.abs(size * step)) < 1e-10:
            break
    active = played.any(axis=1)
    ratings = np.full(len(pts), np.nan)
    if active.any():
        ratings[active] = base + scale / math.log(10) * (theta[active] - theta[active].mean())
    return ratings


def resample_weights(prompts: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, prompts): how often each prompt is drawn in each bootstrap resample (prompts drawn with
    replacement). Every statistic draws the same resamples from the same seed, so their intervals are paired."""
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, prompts, size=(resamples, prompts)) + prompts * np.arange(resamples)[:, None]
    return np.bincount(drawn.ravel(), minlength=resamples * prompts).reshape(resamples, prompts).astype(np.float64)


def bootstrap_mean(
    values: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``values`` (models, prompts; NaN: no score): the mean over prompts, and the percentile
    bootstrap interval at ``level`` from ``resamples`` resamples of the prompts -> (mean, low, high)."""
    values = np.atleast_2d(np.asarray(values, np.float64))
    have = ~np.isnan(values)
    mean = np.array([row[ok].mean() if ok.any() else np.nan for row, ok in zip(values, have)])
    if resamples == 0:
        return mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    weights = resample_weights(values.shape[1], resamples, seed)  # (B, P)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (weights @ np.where(have, values, 0.0).T) / (weights @ have.T)  # (B, M)
    low, high = np.nanquantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return mean, low, high


def bootstrap_elo(
    games: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Elo ratings from ``outcomes`` (prompts, models, models) and their percentile bootstrap interval over
    resampled prompts -> (ratings, low, high)."""
    ratings = elo(points(games))
    if resamples == 0:
        return ratings, np.full_like(ratings, np.nan), np.full_like(ratings, np.nan)
    weights = resample_weights(len(games), resamples, seed)
    fits = np.array([elo(points(games, w)) for w in weights])
    low, high = np.nanquantile(fits, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return ratings, low, high


def best_of_n(scores: Sequence[float], n: int) -> float:
    """The expected best of ``n`` images drawn at random, without replacement, from images with ``scores``.

    Exact: with the scores sorted s_1 <= ... <= s_k, the i-th is the best of a draw in C(i-1, n-1) of the C(k, n)
    draws, so E = sum_i s_i C(i-1, n-1) / C(k, n). n = 1 is the mean; n = k the maximum.
    """
    s = sorted(float(x) for x in scores)
    k = len(s)
    if not 1 <= n <= k:
        raise ValueError(f"best of {n} needs 1 <= {n} <= {k} images")
    total = math.comb(k, n)
    return sum(value * (math.comb(i, n - 1) / total) for i, value in enumerate(s) if i >= n - 1)


def best_of_n_table(scores: Sequence[Sequence[float]], ns: Sequence[int]) -> dict[int, dict[str, float] | None]:
    """One model's prompts -> N -> {score, gain, prompts}: the mean over prompts with at least N scored images of
    the expected best of N, its gain over one random image on those prompts, and how many prompts; None when no
    prompt has N images."""
    out: dict[int, dict[str, float] | None] = {}
    for n in ns:
        eligible = [s for s in scores if len(s) >= n]
        if not eligible:
            out[n] = None
            continue
        best = float(np.mean([best_of_n(s, n) for s in eligible]))
        single = float(np.mean([best_of_n(s, 1) for s in eligible]))  # the same sums: N = 1 gains exactly 0
        out[n] = {"score": best, "gain": best - single, "prompts": len(eligible)}
    return out


def summarize(
    scores: Mapping[str, Sequence[Sequence[float]]],
    best_of: Sequence[int] = (1, 2, 4, 8),
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every statistic for the models' per-prompt image scores (name -> prompts -> scores), models best first."""
    names = list(scores)
    per_model = [scores[name] for name in names]
    best, means = best_scores(per_model), mean_scores(per_model)
    games = outcomes(best)
    ratings, elo_low, elo_high = bootstrap_elo(games, resamples, seed)
    mean, mean_low, mean_high = bootstrap_mean(means, resamples, seed)
    rates = win_rates(best)
    # Best first by Elo, then by mean score; a model with no rating (no games) last.
    order = sorted(range(len(names)), key=lambda m: (-np.nan_to_num(ratings[m], nan=-np.inf), -mean[m]))
    others = len(names) - 1
    models = []
    for rank, m in enumerate(order, 1):
        models.append(
            {
                "rank": rank,
                "name": names[m],
                "elo": json_number(ratings[m]),
                "elo_interval": [json_number(elo_low[m]), json_number(elo_high[m])],
                "mean_score": json_number(mean[m]),
                "mean_score_interval": [json_number(mean_low[m]), json_number(mean_high[m])],
                "win_rate": json_number(np.nanmean(np.delete(rates[m], m))) if others else None,
                "prompts_scored": int((~np.isnan(best[m])).sum()),
                "images_scored": int(sum(len(s) for s in per_model[m])),
                "best_of_n": {str(n): v for n, v in best_of_n_table(per_model[m], best_of).items()},
            }
        )
    return {
        "prompts": int(best.shape[1]),
        "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL, "unit": "prompt"},
        "elo_method": ELO_METHOD,
        "best_of_n_method": BEST_OF_METHOD,
        "best_of": list(best_of),
        "models": models,
        "win_rates": {
            "models": [names[m] for m in order],
            "matrix": [[json_number(rates[a, b]) for b in order] for a in order],
            "meaning": "matrix[a][b]: fraction of prompts where a's best image outscores b's best; ties count half",
        },
    }


def json_number(x: float) -> float | None:
    """A JSON number (rounded to 6 decimals), or None for NaN."""
    return None if x is None or not np.isfinite(x) else round(float(x), 6)
