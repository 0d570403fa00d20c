"""Scoring math: s(x, y) = exp(logit_scale) * <text_emb(x), image_emb(y)>, embeddings L2-normalised.

scores(text_embed, image_embeds, logit_scale)   # one prompt against N images -> (N,) float32
rank_scores(scores, top_k=3)                    # Ranking: best-first order, scores, softmax probabilities
ranks(scores), softmax(scores)                  # one group's places (1 = best) and probabilities, in input order
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pickscore.errors import InvalidInput


@dataclass(frozen=True)
class Ranking:
    """Candidates ranked for one prompt. ``scores``/``probabilities`` are in input order; ``order`` is best first."""

    order: list[int]
    scores: list[float]
    probabilities: list[float]


def scores(text_embed: np.ndarray, image_embeds: np.ndarray, logit_scale: float) -> np.ndarray:
    """One prompt's embedding (D,) against N image embeddings (N, D) -> (N,) float32 scores."""
    dots = image_embeds.astype(np.float32) @ text_embed.astype(np.float32)  # (N,)
    return (np.float32(np.exp(logit_scale)) * dots).astype(np.float32)


def paired_scores(text_embeds: np.ndarray, image_embeds: np.ndarray, logit_scale: float) -> np.ndarray:
    """N prompt embeddings (N, D) against their N images (N, D) -> (N,) scores."""
    dots = np.einsum("nd,nd->n", text_embeds.astype(np.float32), image_embeds.astype(np.float32))
    return (np.float32(np.exp(logit_scale)) * dots).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """Probabilities over the candidates (N,) -> (N,), as PickScore's `softmax(scores)`."""
    if x.size == 0:
        return x.astype(np.float32)
    z = np.exp(x.astype(np.float64) - x.max())
    return (z / z.sum()).astype(np.float32)


def order(x: np.ndarray, top_k: int | None = None) -> np.ndarray:
    """Indices best first; ties keep input order. top_k limits the length."""
    idx = np.argsort(-x, kind="stable")
    return idx if top_k is None else idx[:top_k]


def ranks(x: np.ndarray) -> np.ndarray:
    """Each candidate's place (N,) -> (N,) int64 in input order: 1 = best; equal scores by input order."""
    out = np.empty(len(x), np.int64)
    out[order(x)] = np.arange(1, len(x) + 1)
    return out


def check_top_k(top_k: int | None) -> None:
    """InvalidInput unless ``top_k`` is None (every candidate) or at least 1; call before any compute."""
    if top_k is not None and top_k < 1:
        raise InvalidInput(f"top_k must be at least 1, got {top_k}")


def rank_scores(scores: np.ndarray, top_k: int | None = None) -> Ranking:
    """A Ranking from scores in input order; probabilities are a softmax over all of them, whatever ``top_k``."""
    return Ranking(
        order=order(scores, top_k).tolist(),
        scores=scores.tolist(),
        probabilities=softmax(scores).tolist(),
    )
