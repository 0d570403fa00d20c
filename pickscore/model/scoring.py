"""Scoring math: s(x, y) = exp(logit_scale) * <text_emb(x), image_emb(y)>, embeddings L2-normalised."""

from __future__ import annotations

import numpy as np


def scores(text_embed: np.ndarray, image_embeds: np.ndarray, logit_scale: float) -> np.ndarray:
    """One prompt's embedding (D,) against N image embeddings (N, D) -> (N,) float32 scores."""
    return (np.float32(np.exp(logit_scale)) * (image_embeds.astype(np.float32) @ text_embed.astype(np.float32))).astype(np.float32)


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
