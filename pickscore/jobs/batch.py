"""``pickscore batch``: score and rank a dataset of (prompt, image) rows, resumably, in bounded memory.

    run_batch(["data/*.parquet"], "out/", model="demo")                   # in-process
    run_batch(["shards/"], "out/", servers=["10.0.0.1:8001", "10.0.0.2:8001"])   # on running servers

Inputs (``read_rows``), in a fixed order: Parquet files (columns ``prompt`` and ``image`` (encoded bytes) or
``image_path``; optional ``group`` and ``id``; Pick-a-Pic's ``caption``/``jpg_0``/``jpg_1`` rows give two
candidates each, ranked together), WebDataset tar shards (``KEY.jpg|png|webp`` with ``KEY.txt`` or
``KEY.json`` holding the prompt), and directories holding ``manifest.jsonl`` (``{"image": relative path,
"prompt": ..., "group"?: ..., "id"?: ...}`` per line). Rows of one group (default: one group per prompt)
are ranked together.

Two phases, each restartable. Scoring: rows are cut into shards of ``shard_size`` in input order; each
shard is decoded, scored and written to ``OUT/_scores/shard-NNNNN.parquet`` in one atomic rename, so a
job killed at any moment (SIGKILL included) and started again with ``--resume`` skips the shards it
finished and recomputes the rest, with the same batches and so the same scores. Finalising: ranks and
probabilities within each group need every score of the group, so they are computed from the shard files'
(row, group, score) columns alone, and written as ``OUT/part-NNNNN.parquet`` (one per shard) with
``errors.jsonl`` (rows that could not be scored: ``ERROR_FIELDS``) and ``_SUCCESS`` (counts) last. Memory:
two shards' images at a time while scoring (the next one is decoded, or sent to the servers, while the
current one is encoded or collected); a few dozen bytes a row while finalising.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pickscore.datasets.inputs import count_rows, input_files, read_rows
from pickscore.datasets.rows import Row
from pickscore.errors import InvalidInput

SCORES = "_scores"
# An errors.jsonl line: ``row``, the row's number in the job (from 0 over the input files in the order they are read,
# as the part files' ``row`` column), ``file``, the input file that holds it, ``position``, where in that file (from
# 0: the Parquet row, both candidates of a Pick-a-Pic row sharing it; the WebDataset sample; the manifest.jsonl
# line, blank lines counted), ``id``, and ``error``, the reason alone (the other fields name the row).
ERROR_FIELDS = ("row", "file", "position", "id", "error")
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
        for i, crop in zip(todo, self.scorer.pool.map(load, todo)):
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


@dataclass(frozen=True)
class JobSpec:
    """What makes two runs the same job (checked on --resume)."""

    inputs: list[str]
    model: str
    shard_size: int
    embeddings: bool


def _write_atomically(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_text_atomically(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_table(rows: list[Row], scores: np.ndarray, errors: dict[int, str], extra: dict[str, np.ndarray]) -> pa.Table:
    columns: dict[str, Any] = {
        "row": pa.array([r.index for r in rows], pa.int64()),
        "id": pa.array([r.id for r in rows], pa.string()),
        "group": pa.array([r.group for r in rows], pa.string()),
        "prompt": pa.array([r.prompt for r in rows], pa.string()),
        "score": pa.array([None if i in errors else float(s) for i, s in enumerate(scores)], pa.float32()),
        "error": pa.array([errors.get(i) for i in range(len(rows))], pa.string()),
        "file": pa.array([r.file for r in rows], pa.string()),  # where the row is in its input, for errors.jsonl
        "position": pa.array([r.position for r in rows], pa.int64()),
    }
    for name, values in extra.items():
        columns[name] = pa.array(
            [None if i in errors else values[i].tolist() for i in range(len(rows))], pa.list_(pa.float32())
        )
    return pa.table(columns)


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
    if bool(model) == bool(servers):
        raise ValueError("give either --model (score here) or --server (score on running servers)")
    if embeddings and servers:
        raise ValueError("--embeddings needs --model: the servers answer scores, not embeddings")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(output)
    spec = JobSpec(list(inputs), model or ",".join(servers), shard_size, embeddings)
    _claim(out, spec, resume)
    scores_dir = out / SCORES
    done = {p.name for p in scores_dir.glob("shard-*.parquet")}
    files = input_files(inputs)
    total = count_rows(files)
    scorer = None
    start, scored = time.perf_counter(), 0
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")  # the next shard's decode or sends
    pending = None  # (name, rows, future of prepare): prepared while the shard before it is completed

    def complete(name: str, rows: list[Row], prepared) -> None:
        nonlocal scored
        scores, errors, extra = scorer.complete(rows, prepared.result())
        _write_atomically(shard_table(rows, scores, errors, extra), scores_dir / name)
        scored += len(rows)
        bar.update(len(rows))

    try:
        with tqdm(total=total, unit="img", disable=not progress or None, file=sys.stderr, desc="scoring") as bar:
            for number, rows in shards(read_rows(files), shard_size):
                name = f"shard-{number:05d}.parquet"
                if name in done:
                    bar.update(len(rows))
                    continue
                if scorer is None:
                    scorer = (
                        LocalScorer(model, device, dtype, backend, batch_size, embeddings)
                        if model
                        else ServerScorer(servers, timeout, **connection)
                    )
                following = (name, rows, ahead.submit(scorer.prepare, rows))
                if pending is not None:
                    complete(*pending)
                pending = following
            if pending is not None:
                complete(*pending)
    finally:
        ahead.shutdown(wait=True, cancel_futures=True)
        if scorer is not None:
            scorer.close()
    manifest = finalise(out, spec)
    manifest["images_per_s_this_run"] = scored / max(time.perf_counter() - start, 1e-9)
    return manifest


def _claim(out: Path, spec: JobSpec, resume: bool) -> None:
    """Create OUT for this job, or check that --resume continues the same job there."""
    job = out / "_job.json"
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise ValueError(f"--output {out} is not empty; pass --resume to continue the job there, or pick a new one")
        if not job.exists():
            raise ValueError(f"--output {out} holds no batch job (no _job.json); pick a new --output")
        if json.loads(job.read_text()) != asdict(spec):
            raise ValueError(
                f"--output {out} holds a different job ({job.read_text().strip()}); resume it with the same "
                "arguments, or pick a new --output"
            )
    (out / SCORES).mkdir(parents=True, exist_ok=True)
    if not job.exists():
        _write_text_atomically(json.dumps(asdict(spec), allow_nan=False), job)


def finalise(out: Path, spec: JobSpec) -> dict[str, Any]:
    """Ranks and probabilities within groups, from the shard files; the output parts, errors.jsonl, _SUCCESS."""
    files = sorted((out / SCORES).glob("shard-*.parquet"))
    keys = pa.concat_tables([pq.read_table(f, columns=["row", "group", "score"]) for f in files])
    rows = keys.column("row").to_numpy()
    groups = keys.column("group").to_pylist()
    score = keys.column("score").to_numpy(zero_copy_only=False).astype(np.float64)  # NaN for failed rows
    rank, probability = group_ranks(groups, score)
    by_row = {int(r): k for k, r in enumerate(rows)}
    errors, n_ok = [], 0
    for f in files:
        table = pq.read_table(f)
        positions = np.array([by_row[int(r)] for r in table.column("row").to_pylist()], np.int64)
        failed = np.array([e is not None for e in table.column("error").to_pylist()], bool)
        errors += table.filter(pa.array(failed)).select(list(ERROR_FIELDS)).to_pylist()
        kept = table.filter(pa.array(~failed)).drop(["error", "file", "position"])
        positions = positions[~failed]
        kept = kept.append_column("rank", pa.array(rank[positions], pa.int32()))
        kept = kept.append_column("probability", pa.array(probability[positions], pa.float32()))
        n_ok += kept.num_rows
        _write_atomically(kept, out / f.name.replace("shard-", "part-"))
    _write_text_atomically("".join(json.dumps(e, allow_nan=False) + "\n" for e in errors), out / "errors.jsonl")
    manifest = {
        "rows": int(len(rows)),
        "scored": n_ok,
        "errors": len(errors),
        "groups": len(set(g for g, s in zip(groups, score) if not np.isnan(s))),
        "parts": len(files),
        "model": spec.model,
    }
    _write_text_atomically(json.dumps(manifest, indent=2, allow_nan=False) + "\n", out / "_SUCCESS")
    return manifest


def group_ranks(groups: list[str], scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank within each group (1 = best; equal scores by input order) and the softmax over the group's scores.
    NaN scores (failed rows) get rank 0 and probability NaN and take no part."""
    rank = np.zeros(len(scores), np.int64)
    probability = np.full(len(scores), np.nan, np.float64)
    members: dict[str, list[int]] = {}
    for i, (g, s) in enumerate(zip(groups, scores)):
        if not np.isnan(s):
            members.setdefault(g, []).append(i)
    for idx in members.values():
        idx = np.asarray(idx)
        s = scores[idx]
        order = idx[np.argsort(-s, kind="stable")]
        rank[order] = np.arange(1, len(order) + 1)
        z = np.exp(s - s.max())
        probability[idx] = z / z.sum()
    return rank, probability
