"""scoring.v1 messages from a caller's images and back, shared by the clients: requests split to a server's size,
a server's refusal renumbered to the caller's call, a gRPC failure as its domain error."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np

from pickscore.errors import InvalidInput, PickScoreError
from pickscore.model.scoring import Ranking, rank_scores
from pickscore.status import error_for
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
) -> list[pb.ScoreRequest]:
    """One prompt for all images, or ``prompts`` paired with them, split into requests of ``per_request`` images."""
    if prompts is not None and len(prompts) != len(images):
        raise InvalidInput(f"{len(prompts)} prompts for {len(images)} images")
    messages = image_messages(images, ids)
    return [
        pb.ScoreRequest(prompt=prompt, prompts=[] if prompts is None else prompts[part], images=messages[part])
        for part in _chunks(len(messages), per_request)
    ]


def ranking(response: pb.RankResponse, n: int, top_k: int | None) -> Ranking:
    """A RankResponse over ``n`` images as the Ranking in-process scoring returns."""
    scores = np.zeros(n, np.float32)
    for r in response.ranking:
        scores[r.index] = r.score
    return rank_scores(scores, top_k)


def stream_requests(prompt: str, refs: Iterable[ImageRef], per_request: int) -> Iterator[pb.ScoreStreamRequest]:
    """Tag = index of the request's first image; images read lazily, so memory stays bounded.

    Ids are the paths, or the image's position in the whole job for bytes, so errors name the item.
    """
    batch: list[pb.Image] = []
    start = 0
    for i, ref in enumerate(refs):
        batch.append(image_message(ref, None if isinstance(ref, (str, os.PathLike)) else f"#{i}"))
        if len(batch) == per_request:
            yield pb.ScoreStreamRequest(tag=str(start), request=pb.ScoreRequest(prompt=prompt, images=batch))
            batch, start = [], i + 1
    if batch:
        yield pb.ScoreStreamRequest(tag=str(start), request=pb.ScoreRequest(prompt=prompt, images=batch))


def collect(
    scores: np.ndarray, errors: dict[int, PickScoreError], response: pb.ScoreStreamResponse, skip_invalid: bool
) -> None:
    """One ScoreStream response into ``scores`` (or ``errors``, by the request's first image, with ``skip_invalid``)."""
    start = int(response.tag)
    if response.HasField("error"):
        error = renumbered(error_for(response.error.code, f"server: {response.error.message}"), start)
        if not skip_invalid:
            raise error
        errors[start] = error
        return
    for r in response.response.results:
        scores[start + r.index] = r.score
