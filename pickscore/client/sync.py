"""The blocking client."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
import numpy as np

from pickscore.client.channel import Connection
from pickscore.client.wire import (
    ImageRef,
    Rewards,
    Weights,
    collect,
    domain_error,
    image_messages,
    model_weights,
    ranking,
    renumbered,
    rewards_of,
    rewards_requests,
    score_requests,
    stream_requests,
)
from pickscore.errors import InvalidInput, PickScoreError
from pickscore.model.scoring import Ranking, check_top_k
from pickscore.v1 import scoring_pb2 as pb


class Client(Connection):
    """A blocking client. ``timeout`` (seconds) is the deadline of each call unless a call gives its own."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise domain_error(e) from None

    def model_info(self) -> pb.GetModelInfoResponse:
        """The model this client scores by (asked once, then kept): its name, version, kind, ``identity``
        (NAME:KIND:PRECISION:DIGEST, equal wherever the same weights are served at the same precision) and limits."""
        if self._info is None:
            self._info = self._call(self.stub.GetModelInfo, pb.GetModelInfoRequest(model=self.model), None)
        return self._info

    def list_models(self) -> list[pb.GetModelInfoResponse]:
        """Every model the server serves, the default first: name, version, identity, source, weights_bytes,
        statistics."""
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest(), None).models)

    def _scores(self, requests: list[pb.ScoreRequest], timeout: float | None) -> list[float]:
        """The scores of every request's images, in order; a refusal names the image by its place in all of them."""
        out: list[float] = []
        for request in requests:
            try:
                out += [r.score for r in self._call(self.stub.Score, request, timeout).results]
            except InvalidInput as e:
                raise renumbered(e, len(out)) from None
        return out

    def score(
        self, prompt: str, images: Sequence[ImageRef], ids: Sequence[str] | None = None, timeout: float | None = None
    ) -> list[float]:
        """PickScore of each image for the prompt, in input order."""
        requests = score_requests(
            images, self.model_info().max_images_per_request, prompt=prompt, ids=ids, model=self.model
        )
        return self._scores(requests, timeout)

    def score_pairs(
        self, prompts: Sequence[str], images: Sequence[ImageRef], timeout: float | None = None
    ) -> list[float]:
        """prompts[i] against images[i]."""
        requests = score_requests(images, self.model_info().max_images_per_request, prompts=prompts, model=self.model)
        return self._scores(requests, timeout)

    def rank(
        self, prompt: str, images: Sequence[ImageRef], top_k: int | None = None, timeout: float | None = None
    ) -> Ranking:
        """Best first (``top_k`` long if given), scores and softmax probabilities over all candidates."""
        check_top_k(top_k)
        request = pb.RankRequest(prompt=prompt, images=image_messages(images, None), model=self.model)
        return ranking(self._call(self.stub.Rank, request, timeout), len(images), top_k)

    def score_many(
        self,
        prompt: str,
        images: Iterable[ImageRef],
        per_request: int = 0,
        skip_invalid: bool = False,
        timeout: float | None = None,
    ) -> tuple[np.ndarray, dict[int, PickScoreError]]:
        """Many images over one ScoreStream -> (scores (N,), errors by first index of the failed request; each
        names its image by its place in ``images``, as in-process scoring does).

        ``per_request`` images per request (default 1 with ``skip_invalid``, so a bad image costs only itself;
        else the server's maximum). Without ``skip_invalid`` the first failed request raises.
        """
        refs = list(images)
        per_request = per_request or (1 if skip_invalid else self.model_info().max_images_per_request)
        scores = np.full(len(refs), np.nan, np.float32)
        errors: dict[int, PickScoreError] = {}
        try:
            for response in self.stub.ScoreStream(
                stream_requests(prompt, refs, per_request, self.model), timeout=timeout, metadata=self.metadata
            ):
                collect(scores, errors, response, skip_invalid)
        except grpc.RpcError as e:
            raise domain_error(e) from None
        return scores, errors

    def rewards(
        self,
        prompt: str,
        images: Sequence[ImageRef],
        models: Weights | None = None,
        normalize: str = "none",
        prompts: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> Rewards:
        """Each image scored by every model of ``models`` ({name: weight}; none: the server's default, weight 1)
        and the weighted sum of their scores, each first normalised: "none", "declared" (the model's declared
        map) or "running" (the server's statistics of that model's scores). ``prompts``: one per image, instead of
        ``prompt`` (give "" for it). An unknown model is NotFound naming it and the served ones."""
        weights = model_weights(models)
        per_request = self.model_info().max_images_per_request
        requests = rewards_requests(images, per_request, weights, normalize, prompt=prompt, prompts=prompts)
        responses: list[pb.RewardsResponse] = []
        for request in requests:
            try:
                responses.append(self._call(self.stub.Rewards, request, timeout))
            except InvalidInput as e:
                raise renumbered(e, len(responses) * per_request) from None
        return rewards_of(responses)
