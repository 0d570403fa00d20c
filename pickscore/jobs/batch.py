"""``pickscore batch``: score and rank a dataset of (prompt, image) rows, resumably, in bounded memory.

    run_batch(["data/*.parquet"], "out/", model="demo")                   # in-process
    run_batch(["shards/"], "out/", servers=["10.0.0.1:8001", "10.0.0.2:8001"])   # on running servers

Inputs (``pickscore.datasets.inputs.read_rows``), in a fixed order: Parquet files (columns ``prompt`` and
``image`` (encoded bytes) or ``image_path``; optional ``group`` and ``id``; Pick-a-Pic's ``caption``/``jpg_0``/
``jpg_1`` rows give two candidates each, ranked together), WebDataset tar shards (``KEY.jpg|png|webp`` with
``KEY.txt`` or ``KEY.json`` holding the prompt), and directories holding ``manifest.jsonl`` (``{"image": relative
path, "prompt": ..., "group"?: ..., "id"?: ...}`` per line). Rows of one group (default: one group per prompt) are
ranked together.

Two phases, each restartable, in the job directory ``jobdir`` describes. Scoring: rows are cut into shards of
``shard_size`` in input order; each shard is decoded, scored and written to ``OUT/_scores/shard-NNNNN.parquet`` in
one atomic rename, so a job killed at any moment (SIGKILL included) and started again with ``--resume`` skips the
shards it finished and recomputes the rest, with the same batches and so the same scores. Finalising: ranks and
probabilities within each group need every score of the group, so they are computed from the shard files'
(row, group, score) columns alone, and written as ``OUT/part-NNNNN.parquet`` (one per shard) with
``errors.jsonl`` (rows that could not be scored: ``jobdir.ERROR_FIELDS``) and ``_SUCCESS`` (counts) last. Memory:
two shards' images at a time while scoring (the next one is decoded, or sent to the servers, while the
current one is encoded or collected); a few dozen bytes a row while finalising.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pickscore.datasets.inputs import count_rows, input_files, read_rows
from pickscore.datasets.rows import Row
from pickscore.errors import InvalidInput
from pickscore.jobs.jobdir import (
    JobSpec,
    claim,
    finalise,
    finished_shards,
    shard_path,
    shard_table,
    write_table_atomically,
)

# How a scorer's message names its item: "image 3 (id 'x'): ", after "server: CODE: " or "server: HTTP 400: ".
_ITEM_PREFIX = re.compile(r"^(?:server: (?:[A-Z_]+: |HTTP \d+: )?)?image \d+(?: \(.*?\))?: ")


def item_reason(error: Exception | str) -> str:
    """A message naming its item (``image 3 (id 'x'): reason``, perhaps after ``server: CODE: ``) -> the reason."""
    return _ITEM_PREFIX.sub("", str(error), count=1)


def shards(rows: Iterator[Row], size: int) -> Iterator[tuple[int, list[Row]]]:
    shard, number = [], 0
    for row in rows:
        shard.append(row)
        if len(shard) == size:
            yield number, shard
            shard, number = [], number + 1
    if shard:
        yield number, shard


# Scoring ------------------------------------------------------------------------------------------------


class LocalScorer:
    """Scores a shard in-process: images decoded on every core, prompts and images encoded in batches."""

    def __init__(self, model: str, device: str, dtype: str, backend: str, batch_size: int, embeddings: bool):
        from pickscore.scorer import Scorer

        self.scorer = Scorer.from_pretrained(model, device=device, dtype=dtype, backend=backend, batch_size=batch_size)
        self.embeddings = embeddings

    def prepare(self, rows: list[Row]) -> tuple[dict[int, str], list[int], list[np.ndarray]]:
        """Decode and crop on every core -> (errors by position, the positions that decoded, their crops)."""
        from pickscore.model.preprocess import load_uint8

        errors = {i: r.error for i, r in enumerate(rows) if r.error}
        todo = [i for i in range(len(rows)) if i not in errors]

        def load(i: int):
            row = rows[i]
            try:
                source = row.image if row.image is not None else row.path
                return load_uint8(source, self.scorer.preprocess_config, self.scorer.max_pixels)
            except (InvalidInput, OSError) as e:
                return e

        ok, crops = [], []
        for i, crop in zip(todo, self.scorer.decode_pool.map(load, todo)):
            if isinstance(crop, Exception):
                errors[i] = str(crop)
            else:
                ok.append(i)
                crops.append(crop)
        return errors, ok, crops

    def complete(self, rows: list[Row], prepared) -> tuple[np.ndarray, dict[int, str], dict[str, np.ndarray]]:
        """-> scores (n,) (NaN where failed), errors by position, and embeddings by column when asked."""
        errors, ok, crops = prepared
        prompts = [rows[i].prompt for i in ok]
        scores, extra = score_crops(self.scorer, len(rows), ok, prompts, crops, self.embeddings)
        return scores, errors, extra

    def close(self) -> None:
        self.scorer.close()


def score_crops(
    scorer, n: int, ok: list[int], prompts: list[str], crops: list[np.ndarray], embeddings: bool
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows ``ok`` of ``n`` (their prompts and uint8 crops) -> scores (n,) with NaN elsewhere, and the image and
    text embeddings by column when ``embeddings`` (NaN rows elsewhere). Each distinct prompt is encoded once."""
    from pickscore.model import scoring

    scores = np.full(n, np.nan, np.float32)
    names = ("image_embedding", "text_embedding") if embeddings else ()
    extra = {name: np.full((n, scorer.embed_dim), np.nan, np.float32) for name in names}
    if not ok:
        return scores, extra
    image_embeds = scorer.encode_pixels(np.stack(crops))
    distinct = list(dict.fromkeys(prompts))
    text = np.concatenate([scorer.encode_text(distinct[s : s + 64]) for s in range(0, len(distinct), 64)])
    position = {p: k for k, p in enumerate(distinct)}
    text_embeds = text[[position[p] for p in prompts]]
    scores[ok] = scoring.paired_scores(text_embeds, image_embeds, scorer.logit_scale)
    for name, values in zip(names, (image_embeds, text_embeds)):
        extra[name][ok] = values
    return scores, extra


class ServerScorer:
    """Scores a shard on running servers: rows spread over the addresses, bounded in flight, refusals and
    unavailability retried (``RewardClient``); a bad image fails only its row."""

    def __init__(self, servers: Sequence[str], timeout: float, **connection):
        from pickscore.client import RewardClient

        _model_source(servers[0], timeout, connection)  # fail early, naming the address, when it does not answer
        self.clients = [RewardClient(a, max_batch=32, max_inflight=4, timeout=timeout, **connection) for a in servers]

    def prepare(self, rows: list[Row]) -> tuple[dict[int, str], dict[int, Any]]:
        """Submit the shard's rows (they are sent while the previous shard is collected); a row's image file is
        read here, by the reader the in-process path uses, so one that cannot be read fails its row alike."""
        from pickscore.model.preprocess import read_image_bytes

        errors = {i: r.error for i, r in enumerate(rows) if r.error}
        futures, n = {}, 0
        for i in (i for i in range(len(rows)) if i not in errors):
            try:
                image = read_image_bytes(rows[i].image if rows[i].image is not None else rows[i].path)
            except InvalidInput as e:
                errors[i] = str(e)
                continue
            futures[i] = self.clients[n % len(self.clients)].submit(rows[i].prompt, image)
            n += 1
        return errors, futures

    def complete(self, rows: list[Row], prepared) -> tuple[np.ndarray, dict[int, str], dict[str, np.ndarray]]:
        errors, futures = prepared
        scores = np.full(len(rows), np.nan, np.float32)
        for i, future in futures.items():
            try:
                scores[i] = future.result()
            except InvalidInput as e:  # this row's image; anything else (an outage) stops the job, resumably
                errors[i] = item_reason(e)
        return scores, errors, {}

    def close(self) -> None:
        for client in self.clients:
            client.close()


def _model_source(address: str, timeout: float, connection: dict[str, Any]) -> str:
    """The served model's reference, over gRPC (host:port) or HTTP (http[s]://host:port)."""
    if address.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        from pickscore.tls import ssl_context

        context = ssl_context(connection.get("tls_ca"), connection.get("tls_cert"), connection.get("tls_key"))
        headers = {"authorization": f"Bearer {connection['token']}"} if connection.get("token") else {}
        request = urllib.request.Request(address.rstrip("/") + "/v1/model", headers=headers)
        from pickscore.errors import Unavailable
        from pickscore.status import error_for_http

        try:
            with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
                return json.loads(r.read())["source"]
        except urllib.error.HTTPError as e:  # the server answered: its error, mapped as the clients map it
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                message = e.reason
            raise error_for_http(e.code, f"{address}: HTTP {e.code}: {message}") from None
        except OSError as e:
            raise Unavailable(f"{address}: {e}") from e
    from pickscore.client import Client

    with Client(address, timeout=timeout, **connection) as client:
        return client.model_info().source


# The job ------------------------------------------------------------------------------------------------


def run_batch(
    inputs: Sequence[str],
    output: str | os.PathLike,
    *,
    model: str | None = None,
    servers: Sequence[str] = (),
    resume: bool = False,
    shard_size: int = 1024,
    embeddings: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    backend: str = "auto",
    batch_size: int = 32,
    timeout: float = 600.0,
    progress: bool = True,
    **connection,
) -> dict[str, Any]:
    """Run (or resume) the job; returns the _SUCCESS manifest."""
    _check_arguments(model, servers, embeddings, shard_size)
    out = Path(output)
    spec = JobSpec(list(inputs), model or ",".join(servers), shard_size, embeddings)
    claim(out, spec, resume)
    files = input_files(inputs)

    def scorer() -> LocalScorer | ServerScorer:
        if model:
            return LocalScorer(model, device, dtype, backend, batch_size, embeddings)
        return ServerScorer(servers, timeout, **connection)

    total = count_rows(files)
    start = time.perf_counter()
    scored = _score_shards(out, read_rows(files), shard_size, scorer, total, progress)
    manifest = finalise(out, spec)
    manifest["images_per_s_this_run"] = scored / max(time.perf_counter() - start, 1e-9)
    return manifest


def _check_arguments(model: str | None, servers: Sequence[str], embeddings: bool, shard_size: int) -> None:
    if bool(model) == bool(servers):
        raise ValueError("give either --model (score here) or --server (score on running servers)")
    if embeddings and servers:
        raise ValueError("--embeddings needs --model: the servers answer scores, not embeddings")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")


def _score_shards(
    out: Path,
    rows: Iterator[Row],
    shard_size: int,
    make_scorer: Callable[[], LocalScorer | ServerScorer],
    total: int | None,
    progress: bool,
) -> int:
    """Score and write every shard not yet in OUT; the next shard is prepared (decoded, or sent to the servers)
    while the current one completes. The scorer is made at the first shard to score. -> the rows scored."""
    done = set(finished_shards(out))
    scorer, scored = None, 0
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
    pending = None  # (number, rows, future of prepare): prepared while the shard before it is completed
    try:
        with tqdm(total=total, unit="img", disable=not progress or None, file=sys.stderr, desc="scoring") as bar:
            for number, shard in shards(rows, shard_size):
                if number in done:
                    bar.update(len(shard))
                    continue
                if scorer is None:
                    scorer = make_scorer()
                following = (number, shard, ahead.submit(scorer.prepare, shard))
                if pending is not None:
                    scored += _complete(out, scorer, *pending, bar)
                pending = following
            if pending is not None:
                scored += _complete(out, scorer, *pending, bar)
    finally:
        ahead.shutdown(wait=True, cancel_futures=True)
        if scorer is not None:
            scorer.close()
    return scored


def _complete(
    out: Path, scorer: LocalScorer | ServerScorer, number: int, rows: list[Row], prepared: Future, bar: tqdm
) -> int:
    """Collect one prepared shard and write its shard file -> its rows."""
    scores, errors, extra = scorer.complete(rows, prepared.result())
    write_table_atomically(shard_table(rows, scores, errors, extra), shard_path(out, number))
    bar.update(len(rows))
    return len(rows)
