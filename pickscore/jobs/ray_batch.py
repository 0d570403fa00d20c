"""``pickscore batch --ray [ADDRESS]``: the same job on a Ray cluster, with the same output as in-process.

    run_batch_on_ray(["s3://bucket/shards/*.parquet"], "out/", model="./PickScore_v1", address="auto")

The driver plans and writes; Ray does the work:
  read    one Ray task per input file (our own readers, so rows, ids and groups are exactly the in-process
          path's), each file's first row number fixed beforehand from its metadata (tar files are counted in
          a first pass of tasks), rows streamed out in blocks of 64
  decode  CPU tasks: decode, resize and crop to uint8 (the model's own preprocessing, read from its files)
  score   an actor pool: one scorer per GPU when the cluster has GPUs, else one per ``cpus_per_scorer``
          CPUs; prompts and crops in, scores (and embeddings) out
  write   the driver streams the scored rows in order (``preserve_order``) into the same shard files as
          the in-process path, then finalises identically (ranks, probabilities, errors.jsonl, _SUCCESS)
With ``--resume``, rows of shards already on disk are filtered out before they are decoded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pickscore.datasets.inputs import file_count, file_rows, input_files
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

ROW_COLUMNS = ("row", "id", "group", "prompt", "image", "path", "error", "file", "position")
PASSED_ON = ("row", "id", "group", "prompt", "file", "position")  # what decoding and scoring hand on untouched


def _message(value: Any) -> str | None:
    """A row's error as it comes back from Ray's blocks (an all-null column may return as NaN): str or None."""
    return value if isinstance(value, str) and value else None


def _count(path: Path) -> int:
    """One file's rows: from its metadata when it has them, else by reading it (a tar's headers and members)."""
    known = file_count(path)
    return known if known is not None else sum(1 for _ in file_rows(path))


def _read_task(batch: dict[str, np.ndarray]) -> Iterator[dict[str, list]]:
    """One input file -> its rows, numbered from the file's first global row, in blocks of 64."""
    for file, first, shard_size, done in zip(batch["file"], batch["first"], batch["shard_size"], batch["done"]):
        skip = set(json.loads(done))
        block: dict[str, list] = {c: [] for c in ROW_COLUMNS}
        for k, row in enumerate(file_rows(Path(file))):
            index = int(first) + k
            if index // int(shard_size) in skip:  # --resume: its shard is on disk already
                continue
            for column, value in (
                ("row", index),
                ("id", row.id),
                ("group", row.group),
                ("prompt", row.prompt),
                ("image", row.image),
                ("path", row.path),
                ("error", row.error or None),
                ("file", row.file),
                ("position", row.position),
            ):
                block[column].append(value)
            if len(block["row"]) == 64:
                yield block
                block = {c: [] for c in ROW_COLUMNS}
        if block["row"]:
            yield block


class _Decode:
    """Decode + resize + crop in CPU tasks; the crop travels as (H*W*3,) uint8 with its shape."""

    def __init__(self, preprocess_json: str, max_pixels: int):
        from pickscore.model.preprocess import PreprocessConfig

        self.cfg = PreprocessConfig.from_hf(json.loads(preprocess_json))
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from pickscore.model.preprocess import load_uint8

        crops, errors = [], []
        for image, path, error in zip(batch["image"], batch["path"], batch["error"]):
            crop, message = None, _message(error)
            if message is None:
                try:
                    source = image if isinstance(image, bytes) else path  # an all-null column may come back as NaN
                    crop = load_uint8(source, self.cfg, self.max_pixels)
                except (InvalidInput, OSError) as e:
                    message = str(e)  # the reason: the row's other fields name it
            crops.append(None if crop is None else crop.reshape(-1))
            errors.append(message)
        out = {c: batch[c] for c in PASSED_ON}
        out["crop"] = np.array(crops, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        return out


class _Score:
    """An actor holding the model in its process: crops and prompts in, scores (and embeddings) out."""

    def __init__(self, model: str, device: str, dtype: str, backend: str, batch_size: int, embeddings: bool):
        from pickscore.places import open_place

        self.place = open_place(
            model, embeddings=embeddings, batch_size=batch_size, device=device, dtype=dtype, backend=backend
        )
        self.size = self.place.scorer.preprocess_config.output_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["row"])
        ok = [i for i in range(n) if _message(batch["error"][i]) is None]
        h, w = self.size
        crops = [np.asarray(batch["crop"][i], np.uint8).reshape(h, w, 3) for i in ok]
        scores, extra = self.place.score_crops(n, ok, [batch["prompt"][i] for i in ok], crops)
        out = {c: batch[c] for c in (*PASSED_ON, "error")}
        out["score"] = scores
        out.update(extra)
        return out


def preprocess_json(model: str) -> str:
    """The model's preprocessing as Hugging Face JSON, read from its files (the weights stay where they are)."""
    from pickscore.model.checkpoint import DEMO_DIR, resolve

    directory = DEMO_DIR if model == "demo" else Path(model).expanduser()
    if (directory / "preprocessor_config.json").is_file():
        return (directory / "preprocessor_config.json").read_text()
    return json.dumps(resolve(model).preprocess.to_hf())  # derived from the architecture: load it once here


def run_batch_on_ray(
    inputs: Sequence[str],
    output: str | os.PathLike,
    *,
    model: str,
    address: str | None = None,
    resume: bool = False,
    shard_size: int = 1024,
    embeddings: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    backend: str = "auto",
    batch_size: int = 32,
    scorers: int | None = None,
    cpus_per_scorer: int = 1,
    max_pixels: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the job on Ray; returns the _SUCCESS manifest."""
    import ray

    out = Path(output)
    spec = JobSpec(list(inputs), model, shard_size, embeddings)
    claim(out, spec, resume)
    done = finished_shards(out)
    files = input_files(inputs)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows reach the driver in the job's order
    context.enable_progress_bars = progress

    plan = _plan(ray, files, shard_size, done)
    ds = ray.data.from_items(plan, override_num_blocks=len(plan))
    ds = ds.map_batches(_read_task, batch_size=1, batch_format="numpy")
    ds = _decode_and_score(
        ray,
        ds,
        model=model,
        device=device,
        dtype=dtype,
        backend=backend,
        batch_size=batch_size,
        embeddings=embeddings,
        scorers=scorers,
        cpus_per_scorer=cpus_per_scorer,
        max_pixels=max_pixels,
    )
    _write_shards(ds, out, shard_size, embeddings)
    return finalise(out, spec)


def _plan(ray, files: list[Path], shard_size: int, done: list[int]) -> list[dict[str, Any]]:
    """One read task's work per input file: the file, its first row number in the job, the shards to leave out."""
    counts = ray.get([ray.remote(_count).remote(f) for f in files])  # each file's rows, in parallel
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    return [
        {"file": str(f), "first": int(first), "shard_size": shard_size, "done": json.dumps(done)}
        for f, first in zip(files, firsts)
    ]


def _decode_and_score(
    ray,
    ds,
    *,
    model: str,
    device: str,
    dtype: str,
    backend: str,
    batch_size: int,
    embeddings: bool,
    scorers: int | None,
    cpus_per_scorer: int,
    max_pixels: int | None,
):
    """The read rows -> decoded in CPU tasks -> scored by an actor pool (``scorers``, else one scorer per GPU, else
    one per ``cpus_per_scorer`` CPUs, half the cluster's)."""
    from pickscore.model.preprocess import DEFAULT_MAX_PIXELS

    resources = ray.cluster_resources()
    cpus, gpus = max(1, int(resources.get("CPU", 1))), int(resources.get("GPU", 0))
    on_gpu = gpus > 0 and device != "cpu"
    pool = scorers or (gpus if on_gpu else max(1, cpus // (2 * cpus_per_scorer)))
    ds = ds.map_batches(
        _Decode,
        fn_constructor_args=(preprocess_json(model), max_pixels or DEFAULT_MAX_PIXELS),
        batch_size=64,
        batch_format="numpy",
        concurrency=(1, cpus),
    )
    return ds.map_batches(
        _Score,
        fn_constructor_args=(model, device, dtype, backend, batch_size, embeddings),
        batch_size=max(batch_size, 64),
        batch_format="numpy",
        concurrency=pool,
        num_gpus=1 if on_gpu else 0,
        num_cpus=0 if on_gpu else cpus_per_scorer,
    )


def _write_shards(ds, out: Path, shard_size: int, embeddings: bool) -> None:
    """Scored rows, streamed in order, into the in-process path's shard files (same rows per shard; the rows
    of shards already on disk were left out by the read tasks)."""
    pending: list[Row] = []
    scores: list[float] = []
    errors: list[str | None] = []
    extra: dict[str, list] = {"image_embedding": [], "text_embedding": []}
    current = None

    def flush() -> None:
        if not pending:
            return
        err = {i: e for i, e in enumerate(errors) if e is not None}
        columns = {k: np.stack(v) for k, v in extra.items()} if embeddings else {}
        table = shard_table(pending, np.asarray(scores, np.float32), err, columns)
        write_table_atomically(table, shard_path(out, current))
        for values in (pending, scores, errors, *extra.values()):
            values.clear()

    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        for i in range(len(batch["row"])):
            row = int(batch["row"][i])
            shard = row // shard_size
            if shard != current:
                flush()
                current = shard
            pending.append(
                Row(
                    row,
                    str(batch["id"][i]),
                    str(batch["group"][i]),
                    str(batch["prompt"][i]),
                    file=str(batch["file"][i]),
                    position=int(batch["position"][i]),
                )
            )
            scores.append(float(batch["score"][i]))
            errors.append(_message(batch["error"][i]))
            if embeddings:
                extra["image_embedding"].append(batch["image_embedding"][i])
                extra["text_embedding"].append(batch["text_embedding"][i])
    flush()
