"""A batch job's output directory: the protocol every runner (in-process, on servers, on Ray) writes by.

OUT/_job.json                    the job's arguments (``JobSpec``), first: ``--resume`` continues only them
OUT/_scores/shard-NNNNN.parquet  a shard's rows scored (``shard_table``), each file one atomic rename
OUT/part-NNNNN.parquet           a shard's scored rows with rank and probability in their groups (``finalise``)
OUT/errors.jsonl                 the rows that could not be scored (``ERROR_FIELDS``)
OUT/_SUCCESS                     the counts, written last
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pickscore.datasets.rows import Row
from pickscore.model import scoring

SCORES = "_scores"
# An errors.jsonl line: ``row``, the row's number in the job (from 0 over the input files in the order they are read,
# as the part files' ``row`` column), ``file``, the input file that holds it, ``position``, where in that file (from
# 0: the Parquet row, both candidates of a Pick-a-Pic row sharing it; the WebDataset sample; the manifest.jsonl
# line, blank lines counted), ``id``, and ``error``, the reason alone (the other fields name the row).
ERROR_FIELDS = ("row", "file", "position", "id", "error")


@dataclass(frozen=True)
class JobSpec:
    """What makes two runs the same job (checked on --resume)."""

    inputs: list[str]
    model: str
    shard_size: int
    embeddings: bool


def claim(out: Path, spec: JobSpec, resume: bool) -> None:
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
        write_text_atomically(json.dumps(asdict(spec), allow_nan=False), job)


def shard_path(out: Path, number: int) -> Path:
    """Where shard ``number`` (rows ``number * shard_size`` on) is written once scored."""
    return out / SCORES / f"shard-{number:05d}.parquet"


def finished_shards(out: Path) -> list[int]:
    """The numbers of the shards already scored in OUT, in order."""
    return sorted(int(p.stem.split("-")[1]) for p in (out / SCORES).glob("shard-*.parquet"))


def write_table_atomically(table: pa.Table, path: Path) -> None:
    """``table`` as Parquet at ``path``, which is either absent or whole whenever the process dies."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_text_atomically(text: str, path: Path) -> None:
    """``text`` at ``path``, which is either absent or whole whenever the process dies."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_table(rows: list[Row], scores: np.ndarray, errors: dict[int, str], extra: dict[str, np.ndarray]) -> pa.Table:
    """A scored shard: its rows (where they are in their inputs too), scores, errors by position in the shard, and
    the embeddings by column when asked."""
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
        write_table_atomically(kept, out / f.name.replace("shard-", "part-"))
    write_text_atomically("".join(json.dumps(e, allow_nan=False) + "\n" for e in errors), out / "errors.jsonl")
    manifest = {
        "rows": int(len(rows)),
        "scored": n_ok,
        "errors": len(errors),
        "groups": len(set(g for g, s in zip(groups, score) if not np.isnan(s))),
        "parts": len(files),
        "model": spec.model,
    }
    write_text_atomically(json.dumps(manifest, indent=2, allow_nan=False) + "\n", out / "_SUCCESS")
    return manifest


def group_ranks(groups: list[str], scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank within each group (1 = best; equal scores by input order) and the softmax over the group's scores, as
    ``model.scoring`` ranks one prompt's candidates. NaN scores (failed rows) get rank 0 and probability NaN and take
    no part."""
    rank = np.zeros(len(scores), np.int64)
    probability = np.full(len(scores), np.nan, np.float64)
    members: dict[str, list[int]] = {}
    for i, (g, s) in enumerate(zip(groups, scores)):
        if not np.isnan(s):
            members.setdefault(g, []).append(i)
    for idx in map(np.asarray, members.values()):
        rank[idx] = scoring.ranks(scores[idx])
        probability[idx] = scoring.softmax(scores[idx])
    return rank, probability
