"""scoring.v1 messages from a caller's images and back, shared by the clients: requests split to a server's size,
a server's refusal renumbered to the caller's call, a gRPC failure as its domain error."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from pickscore.errors import InvalidInput, PickScoreError
from pickscore.model.scoring import Ranking, rank_scores
from pickscore.status import RETRY_PUSHBACK, error_for
from pickscore.v1 import scoring_pb2 as pb

ImageRef = bytes | str | os.PathLike | np.ndarray  # encoded bytes, a file, or uint8 pixels (H, W[, 3 or 4])
# How a server's refusal names the image of its request: "image 3", after "server: CODE: " or "server: HTTP 400: ".
_ITEM = re.compile(r"^(server: (?:[A-Z_]+: |HTTP \d+: )?)?image (\d+)")


def domain_error(e: grpc.RpcError) -> PickScoreError:
    """A gRPC failure as the domain error the server mapped it from."""
    return error_for(e.code(), f"server: {e.code().name}: {e.details()}", e.trailing_metadata() or ())


def image_message(ref: ImageRef, id: str | None) -> pb.Image:
    """One image as scoring.v1's Image: pixels sent as they are, bytes as they are, a path read here."""
    if isinstance(ref, np.ndarray):  # sent as they are: no encoding here, no decoding there
        if ref.dtype != np.uint8 or ref.ndim not in (2, 3):
            raise InvalidInput(f"pixels must be uint8 (height, width[, channels]); got {ref.dtype} {ref.shape}")
        channels = 1 if ref.ndim == 2 else ref.shape[2]
        pixels = pb.Pixels(height=ref.shape[0], width=ref.shape[1], channels=channels, data=ref.tobytes())
        return pb.Image(pixels=pixels, id=id or "")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return pb.Image(data=bytes(ref), id=id or "")
    return pb.Image(data=Path(ref).read_bytes(), id=str(ref) if id is None else id)


def image_messages(refs: Sequence[ImageRef], ids: Sequence[str] | None) -> list[pb.Image]:
    if ids is not None and len(ids) != len(refs):
        raise InvalidInput(f"{len(ids)} ids for {len(refs)} images")
    return [image_message(ref, None if ids is None else ids[i]) for i, ref in enumerate(refs)]


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def renumbered(error: PickScoreError, offset: int) -> PickScoreError:
    """An InvalidInput naming image K of a request that began at the caller's image ``offset``, as image offset + K:
    an image is named by its place in the caller's call, not in the request it was sent in."""
    if not offset or not isinstance(error, InvalidInput):
        return error
    return InvalidInput(_ITEM.sub(lambda m: f"{m[1] or ''}image {offset + int(m[2])}", str(error), count=1))


def score_requests(
    images: Sequence[ImageRef],
    per_request: int,
    prompt: str = "",
    prompts: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    model: str = "",
) -> list[pb.ScoreRequest]:
    """One prompt for all images, or ``prompts`` paired with them, split into requests of ``per_request`` images,
    each scored by ``model`` (empty: the server's default)."""
    return [
        pb.ScoreRequest(prompt=prompt, prompts=part_prompts, images=part_images, model=model)
        for part_prompts, part_images in _parts(images, per_request, prompts, ids)
    ]


def _parts(
    images: Sequence[ImageRef], per_request: int, prompts: Sequence[str] | None, ids: Sequence[str] | None = None
) -> list[tuple[Sequence[str], list[pb.Image]]]:
    """(prompts, image messages) of each request of at most ``per_request`` images; no prompts: one for all."""
    if prompts is not None and len(prompts) != len(images):
        raise InvalidInput(f"{len(prompts)} prompts for {len(images)} images")
    messages = image_messages(images, ids)
    return [([] if prompts is None else prompts[part], messages[part]) for part in _chunks(len(messages), per_request)]


def ranking(response: pb.RankResponse, n: int, top_k: int | None) -> Ranking:
    """A RankResponse over ``n`` images as the Ranking in-process scoring returns."""
    scores = np.zeros(n, np.float32)
    for r in response.ranking:
        scores[r.index] = r.score
    return rank_scores(scores, top_k)


def stream_requests(
    prompt: str, refs: Iterable[ImageRef], per_request: int, model: str = ""
) -> Iterator[pb.ScoreStreamRequest]:
    """Tag = index of the request's first image; images read lazily, so memory stays bounded.

    Ids are the paths, or the image's position in the whole job for bytes, so errors name the item.
    """
    batch: list[pb.Image] = []
    start = 0
    for i, ref in enumerate(refs):
        batch.append(image_message(ref, None if isinstance(ref, (str, os.PathLike)) else f"#{i}"))
        if len(batch) == per_request:
            yield pb.ScoreStreamRequest(
                tag=str(start), request=pb.ScoreRequest(prompt=prompt, images=batch, model=model)
            )
            batch, start = [], i + 1
    if batch:
        yield pb.ScoreStreamRequest(tag=str(start), request=pb.ScoreRequest(prompt=prompt, images=batch, model=model))


def collect(
    scores: np.ndarray, errors: dict[int, PickScoreError], response: pb.ScoreStreamResponse, skip_invalid: bool
) -> None:
    """One ScoreStream response into ``scores`` (or ``errors``, by the request's first image, with ``skip_invalid``)."""
    start = int(response.tag)
    if response.HasField("error"):
        hint = [(RETRY_PUSHBACK, str(response.error.retry_after_ms))] if response.error.retry_after_ms else []
        error = renumbered(error_for(response.error.code, f"server: {response.error.message}", hint), start)
        if not skip_invalid:
            raise error
        errors[start] = error
        return
    for r in response.response.results:
        scores[start + r.index] = r.score


# Rewards: one request scored by several models, weighted ----------------------------------------------------

NORMALIZE = {"none": pb.NORMALIZE_NONE, "declared": pb.NORMALIZE_DECLARED, "running": pb.NORMALIZE_RUNNING}
Weights = Mapping[str, float] | Sequence[tuple[str, float]]  # {"pickscore": 1.0, "other": 0.5}, or such pairs


def model_weights(models: Weights | None) -> list[tuple[str, float]]:
    """``models`` as (name, weight) pairs in the caller's order; none: the server's default model, weight 1. A
    ValueError names a model whose weight is not a finite number, or one named twice."""
    if models is None:
        return []
    pairs = [(str(name), weight) for name, weight in (models.items() if isinstance(models, Mapping) else models)]
    if not pairs:
        raise ValueError("models: name at least one model and its weight (or give none: the default model)")
    for name, weight in pairs:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"models: model {name!r}: weight {weight!r} is not a finite number")
    names = [name for name, _ in pairs]
    if len(set(names)) < len(names):
        raise ValueError(f"models: {', '.join(sorted({n for n in names if names.count(n) > 1}))} named twice")
    return [(name, float(weight)) for name, weight in pairs]


def normalize_of(normalize: str) -> str:
    """``normalize`` checked: none, declared or running (protobuf's NORMALIZE_* names too)."""
    name = normalize.lower().removeprefix("normalize_")
    if name not in NORMALIZE:
        raise ValueError(f"normalize {normalize!r}: one of {', '.join(NORMALIZE)}")
    return name


def rewards_requests(
    images: Sequence[ImageRef],
    per_request: int,
    models: list[tuple[str, float]],
    normalize: str,
    prompt: str = "",
    prompts: Sequence[str] | None = None,
) -> list[pb.RewardsRequest]:
    """One prompt for all images, or ``prompts`` paired with them, split into Rewards requests of ``per_request``."""
    weights = [pb.ModelWeight(model=name, weight=weight) for name, weight in models]
    return [
        pb.RewardsRequest(
            prompt=prompt,
            prompts=part_prompts,
            images=part_images,
            models=weights,
            normalize=NORMALIZE[normalize_of(normalize)],
        )
        for part_prompts, part_images in _parts(images, per_request, prompts)
    ]


@dataclass(frozen=True)
class ModelRewards:
    """One model's part of the rewards: the version that scored, its weight, its raw and its normalised scores."""

    model: str
    version: str
    weight: float
    scores: np.ndarray  # (N,) raw, in input order
    normalized: np.ndarray  # (N,) what the weighted sum took (the raw scores with normalize "none")


@dataclass(frozen=True)
class Rewards:
    """Per image, in input order, the sum over models of weight x normalised score; and each model's part, by name
    in the order asked (the default model under its own name)."""

    rewards: np.ndarray  # (N,) float32
    models: dict[str, ModelRewards]


def rewards_of(responses: Sequence[pb.RewardsResponse]) -> Rewards:
    """The answers to one call's Rewards requests, joined in order."""
    rewards = np.array([r for response in responses for r in response.rewards], np.float32)
    parts: dict[str, ModelRewards] = {}
    for k, first in enumerate(responses[0].models if responses else ()):
        column = [response.models[k] for response in responses]
        parts[first.model] = ModelRewards(
            first.model,
            ",".join(dict.fromkeys(m.version for m in column)),  # one, unless a new version came in mid-call
            first.weight,
            np.array([s for m in column for s in m.scores], np.float32),
            np.array([s for m in column for s in m.normalized], np.float32),
        )
    return Rewards(rewards, parts)
