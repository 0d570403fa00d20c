"""``pickscore batch``: score and rank a dataset of (prompt, image) rows, resumably, in bounded memory.

    run_batch(["data/*.parquet"], "out/", model="demo")                   # in-process
    run_batch(["shards/"], "out/", servers=["10.0.0.1:8001", "10.0.0.2:8001"])   # on running servers
    run_batch(["shards/"], "out/", servers=["10.0.0.1:8001"], model_name="pickscore,other")   # two of their models

Inputs (``pickscore.datasets.inputs.read_rows``), in a fixed order: Parquet files (columns ``prompt`` and
``image`` (encoded bytes) or ``image_path``; optional ``group`` and ``id``; Pick-a-Pic's ``caption``/``jpg_0``/
``jpg_1`` rows give two candidates each, ranked together), WebDataset tar shards (``KEY.jpg|png|webp`` with
``KEY.txt`` or ``KEY.json`` holding the prompt), and directories holding ``manifest.jsonl`` (``{"image": relative
path, "prompt": ..., "group"?: ..., "id"?: ...}`` per line). Rows of one group (default: one group per prompt) are
ranked together.

Several models (``model_name="a,b"``, ``--model-name a,b``; with servers only): every row is scored by each of the
servers' models in ONE request per batch of rows (scoring.v1 ``Rewards`` / ``POST /v1/rewards``: each image decoded
once; ``several_models``), and the output has a score column per model, ``score_a`` and ``score_b``, each ranked
apart (``rank_a``, ``probability_a``, ...): a column of ranks is a scorer's verdict on the group, and comparing
scorers is why one asks for several, so no model's ranking stands for the others'. One model (or none: the servers'
default) keeps the columns ``score``, ``rank`` and ``probability``. The model names are part of the job:
``--resume`` with other names is refused, never mixing two models' scores in one column.

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

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pickscore.datasets.inputs import count_rows, input_files, read_rows
from pickscore.datasets.rows import Row
from pickscore.jobs.jobdir import (
    JobSpec,
    claim,
    finalise,
    finished_shards,
    record_identities,
    score_columns,
    shard_path,
    shard_table,
    write_table_atomically,
)
from pickscore.places import Place, check_where, model_names, open_place


def shards(rows: Iterator[Row], size: int) -> Iterator[tuple[int, list[Row]]]:
    shard, number = [], 0
    for row in rows:
        shard.append(row)
        if len(shard) == size:
            yield number, shard
            shard, number = [], number + 1
    if shard:
        yield number, shard


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
    model_name: str | Sequence[str] = "",
    expect_model: str = "",
    **connection,
) -> dict[str, Any]:
    """Run (or resume) the job; returns the _SUCCESS manifest. ``model_name``: the servers' model that scores
    (empty: their default), or several ("a,b" or a list): a score column each. ``expect_model``: the model
    identity (or identities, one per name) the servers must serve; without it they must all serve one."""
    names = model_names(model_name)
    _check_arguments(model, servers, embeddings, shard_size, names, expect_model)
    out = Path(output)
    spec = JobSpec(list(inputs), model or ",".join(servers), shard_size, embeddings, names)
    claim(out, spec, resume)
    files = input_files(inputs)

    def place() -> Place:
        if len(names) > 1:
            from pickscore.jobs.several_models import ModelsOnServers

            opened: Any = ModelsOnServers(servers, timeout, connection, names, expect_model)
        else:
            opened = open_place(
                model, servers, embeddings=embeddings, batch_size=batch_size, timeout=timeout, connection=connection,
                device=device, dtype=dtype, backend=backend, model_name=names[0] if names else "",
                expect_model=expect_model,
            )  # fmt: skip
        try:  # servers that do not answer, or serve different models, fail the job here, naming them
            record_identities(out, opened.identities)
        except BaseException:
            opened.close()
            raise
        return opened

    total = count_rows(files)
    start = time.perf_counter()
    columns = score_columns(names)
    scored = _score_shards(out, read_rows(files), shard_size, place, total, progress, columns)
    manifest = finalise(out, spec)
    manifest["images_per_s_this_run"] = scored / max(time.perf_counter() - start, 1e-9)
    return manifest


def _check_arguments(
    model: str | None, servers: Sequence[str], embeddings: bool, shard_size: int, names: list[str], expect: str
) -> None:
    check_where(model, servers, embeddings, ",".join(names), expect)
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")


def _score_shards(
    out: Path,
    rows: Iterator[Row],
    shard_size: int,
    opener: Callable[[], Place],
    total: int | None,
    progress: bool,
    columns: list[str],
) -> int:
    """Score and write every shard not yet in OUT; the next shard is prepared (decoded, or sent to the servers)
    while the current one completes. The place is opened at the first shard to score. -> the rows scored."""
    done = set(finished_shards(out))
    place, scored = None, 0
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
    pending = None  # (number, rows, future of prepare): prepared while the shard before it is completed
    try:
        with tqdm(total=total, unit="img", disable=not progress or None, file=sys.stderr, desc="scoring") as bar:
            for number, shard in shards(rows, shard_size):
                if number in done:
                    bar.update(len(shard))
                    continue
                if place is None:
                    place = opener()
                following = (number, shard, ahead.submit(place.prepare, shard))
                if pending is not None:
                    scored += _complete(out, place, *pending, bar, columns)
                pending = following
            if pending is not None:
                scored += _complete(out, place, *pending, bar, columns)
    finally:
        ahead.shutdown(wait=True, cancel_futures=True)
        if place is not None:
            place.close()
    return scored


def _complete(
    out: Path, place: Place, number: int, rows: list[Row], prepared: Future, bar: tqdm, columns: list[str]
) -> int:
    """Collect one prepared shard and write its shard file (a score column a model) -> its rows."""
    scores, errors, extra = place.complete(rows, prepared.result())
    write_table_atomically(shard_table(rows, scores, errors, extra, columns), shard_path(out, number))
    bar.update(len(rows))
    return len(rows)
