"""scoring.v1's operations on plain data, whatever the transport: Score, Rank, Rewards (one request scored by
several models, weighted), GetModelInfo and ListModels. KServe v2's models are ``api_kserve``'s.

    scoring = Scoring(repository)
    await scoring.rank("a cat", [ImageItem(jpeg)], top_k=1, deadline=None)    # [RankedImage(0, "", 21.3, 1.0)]
    await scoring.score("a cat", [], items, None, model="aesthetic")          # another served model
    await scoring.rewards("a cat", [], items, [("pickscore", 1.0), ("hps", 0.5)], "running", None)

The transports (scoring_v1 over gRPC, http over HTTP) decode their wire into these calls and encode the answers;
what is checked whatever the wire is checked here, once. Errors are ``pickscore.errors``, which each transport
maps to its own wire. A request names its model (empty: the server's default); the versions it is scored by are
held for the whole request (``Repository.use``), so a swap never mixes two versions in one answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pickscore.errors import InvalidInput
from pickscore.server.engine import ImageItem, score_together
from pickscore.server.repository import Repository, ServedModel
from pickscore.version import __version__

NORMALIZE = ("none", "declared", "running")  # Rewards: raw scores, the model's declared map, the server's statistics


@dataclass(frozen=True)
class ModelInfo:
    """A served model and the server's limits (GetModelInfo; the fields in the message's order)."""

    source: str
    backend: str
    device: str
    embed_dim: int
    logit_scale: float
    image_size: int
    context_length: int
    max_batch_size: int
    max_images_per_request: int
    max_image_bytes: int
    version: str
    model: str  # its name: what requests give to choose it
    model_version: str
    weights_bytes: int  # its weights where they are loaded, counted at load
    scores_seen: int  # the running statistics of normalize=running
    score_mean: float
    score_std: float
    kind: str  # what the model is: clip, hps, aesthetic, image_reward
    identity: str  # name:kind:precision:weights digest (backends.model_identity), composed once at load


@dataclass(frozen=True)
class ScoredImage:
    index: int
    id: str
    score: float


@dataclass(frozen=True)
class RankedImage:
    index: int
    id: str
    score: float
    probability: float


@dataclass(frozen=True)
class ModelScores:
    """One model's part of a Rewards answer: its raw scores, and the scores the weighted sum took."""

    model: str
    version: str
    weight: float
    scores: list[float]
    normalized: list[float]


@dataclass(frozen=True)
class Rewards:
    rewards: list[float]  # per image: the sum over models of weight x normalised score
    models: list[ModelScores]


@dataclass(frozen=True)
class RawPixels:
    """An image's decoded pixels as a request carries them: row-major uint8, ``channels`` 0 meaning 3."""

    height: int
    width: int
    channels: int
    data: bytes


def image_item(index: int, data: bytes = b"", id: str = "", pixels: RawPixels | None = None) -> ImageItem:
    """The request's ``index``-th image; InvalidInput naming it when its pixels do not fit their shape."""
    return ImageItem(data, id, None if pixels is None else _pixels(ImageItem(id=id).describe(index), pixels))


def _pixels(name: str, p: RawPixels) -> np.ndarray:
    """(height, width, channels) uint8, or (height, width) for gray."""
    channels = p.channels or 3
    if channels not in (1, 3, 4):
        raise InvalidInput(f"{name}: pixels have {channels} channels; 1 (gray), 3 (RGB) or 4 (RGBA)")
    if len(p.data) != p.height * p.width * channels:
        raise InvalidInput(
            f"{name}: {len(p.data)} bytes of pixels for {p.height}x{p.width}x{channels} "
            f"({p.height * p.width * channels} expected)"
        )
    pixels = np.frombuffer(p.data, np.uint8).reshape(p.height, p.width, channels)
    return pixels[..., 0] if channels == 1 else pixels


class Scoring:
    """scoring.v1's operations over the served models."""

    def __init__(self, repository: Repository):
        self.repository = repository
        self.settings = repository.settings

    def model_info(self, model: str = "") -> ModelInfo:
        return self._info(self.repository.get(model))

    def models(self) -> list[ModelInfo]:
        """Every model in service, the default first."""
        r = self.repository
        return [self._info(r.serving[name]) for name in sorted(r.serving, key=lambda n: (n != r.default, n))]

    def _info(self, model: ServedModel) -> ModelInfo:
        backend, s, stats = model.backend, self.settings, model.engine.stats
        return ModelInfo(
            source=backend.source,
            backend=backend.name,
            device=backend.description,
            embed_dim=backend.embed_dim,
            logit_scale=float(backend.logit_scale),
            image_size=backend.preprocess.output_size[0],
            context_length=backend.tokenizer.context_length,
            max_batch_size=s.max_batch_size,
            max_images_per_request=s.max_images_per_request,
            max_image_bytes=s.max_image_bytes,
            version=__version__,
            model=model.name,
            model_version=model.version,
            weights_bytes=model.weights_bytes,
            scores_seen=stats.count,
            score_mean=stats.mean,
            score_std=stats.std,
            kind=backend.kind,
            identity=model.identity,
        )

    async def score(
        self,
        prompt: str,
        prompts: Sequence[str],
        images: Sequence[ImageItem],
        deadline: float | None,
        model: str = "",
    ) -> list[ScoredImage]:
        """``prompt`` for every image, or ``prompts``, one per image: one of the two."""
        with self.repository.use([model]) as (served,):
            scores = await served.engine.score(_prompts(prompt, prompts), images, deadline)
        return [ScoredImage(i, item.id, float(s)) for i, (item, s) in enumerate(zip(images, scores))]

    async def rank(
        self, prompt: str, images: Sequence[ImageItem], top_k: int | None, deadline: float | None, model: str = ""
    ) -> list[RankedImage]:
        """Best first; ``top_k`` 0 or None: every image."""
        with self.repository.use([model]) as (served,):
            ranking = await served.engine.rank(prompt, images, top_k or None, deadline)
        return [
            RankedImage(i, images[i].id, float(ranking.scores[i]), float(ranking.probabilities[i]))
            for i in ranking.order
        ]

    async def rewards(
        self,
        prompt: str,
        prompts: Sequence[str],
        images: Sequence[ImageItem],
        weights: Sequence[tuple[str, float]],
        normalize: str,
        deadline: float | None,
    ) -> Rewards:
        """Every image scored by each model of ``weights`` ((model, weight); none: the default model, weight 1), each
        image decoded once for the models that preprocess alike; the reward is the weighted sum of the scores,
        each first ``normalize``d: none, declared (the model's declared affine map), or running (by the mean and
        standard deviation of every score that version gave, this request's included)."""
        if normalize not in NORMALIZE:
            raise InvalidInput(f"normalize {normalize!r}: one of {', '.join(NORMALIZE)}")
        weights = list(weights) or [("", 1.0)]
        for name, weight in weights:
            if not math.isfinite(weight):
                raise InvalidInput(f"model {name!r}: weight {weight} is not a finite number")
        with self.repository.use([name for name, _ in weights]) as served:
            if normalize == "declared":
                for m in served:
                    if m.spec.normalize is None:
                        raise InvalidInput(
                            f"model {m.name!r} declares no normalisation (its repository's model.json "
                            '{"normalize": {"mean": M, "std": S}}); ask for normalize running or none'
                        )
            engines = [m.engine for m in served]
            scores = await score_together(engines, _prompts(prompt, prompts), images, deadline)
            parts, total = [], np.zeros(len(images), np.float64)
            for m, (_, weight), raw in zip(served, weights, scores):
                normalized = _normalized(m, raw, normalize)
                total += weight * normalized
                parts.append(
                    ModelScores(m.name, m.version, weight, raw.tolist(), normalized.astype(np.float32).tolist())
                )
        return Rewards(total.astype(np.float32).tolist(), parts)


def _prompts(prompt: str, prompts: Sequence[str]) -> list[str]:
    if prompt and prompts:
        raise InvalidInput("set either prompt (one for all images) or prompts (one per image), not both")
    return list(prompts) or [prompt]


def _normalized(model: ServedModel, scores: np.ndarray, normalize: str) -> np.ndarray:
    x = scores.astype(np.float64)
    if normalize == "declared":
        return (x - model.spec.normalize.mean) / model.spec.normalize.std
    if normalize == "running":
        stats = model.engine.stats  # this request's scores are in it already
        return (x - stats.mean) / max(stats.std, 1e-6)
    return x
