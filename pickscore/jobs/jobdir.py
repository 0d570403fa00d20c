"""A batch job's output directory: the protocol every runner (in-process, on servers, on Ray) writes by.

OUT/_job.json                    the job's arguments (``JobSpec``), first: ``--resume`` continues only them
OUT/_model.json                  the model identities that score it (``record_identities``): a resume must match
OUT/_scores/shard-NNNNN.parquet  a shard's rows scored (``shard_table``), each file one atomic rename
OUT/part-NNNNN.parquet           a shard's scored rows with rank and probability in their groups (``finalise``)
                                 (with several models, score/rank/probability per model: ``score_columns``)
OUT/errors.jsonl                 the rows that could not be scored (``ERROR_FIELDS``)
OUT/_SUCCESS                     the counts and the model identities, written last
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pickscore.datasets.rows import Row
from pickscore.model import scoring

SCORES = "_scores"
MODEL = "_model.json"
# An errors.jsonl line: ``row``, the row's number in the job (from 0 over the input files in the order they are read,
# as the part files' ``row`` column), ``file``, the input file that holds it, ``position``, where in that file (from
# 0: the Parquet row, both candidates of a Pick-a-Pic row sharing it; the WebDataset sample; the manifest.jsonl
# line, blank lines counted), ``id``, and ``error``, the reason alone (the other fields name the row).
ERROR_FIELDS = ("row", "file", "position", "id", "error")


@dataclass(frozen=True)
class JobSpec:
    """What makes two runs the same job (checked on --resume). ``model``: the model (in-process) or the servers'
    addresses; ``model_names``: the servers' models that score (``--model-name``; none: each server's default)."""

    inputs: list[str]
    model: str
    shard_size: int
    embeddings: bool
    model_names: list[str] = field(default_factory=list)


def score_columns(model_names: Sequence[str]) -> list[str]:
    """A job's score columns: ``score`` for one model (or the default), ``score_<name>`` per model for several; the
    rank and probability columns are named alike (``rank``, ``rank_<name>``, ...)."""
    return ["score"] if len(model_names) <= 1 else [f"score_{name}" for name in model_names]


def claim(out: Path, spec: JobSpec, resume: bool) -> None:
    """Create OUT for this job, or check that --resume continues the same job there."""
    job = out / "_job.json"
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise ValueError(f"--output {out} is not empty; pass --resume to continue the job there, or pick a new one")
        if not job.exists():
            raise ValueError(f"--output {out} holds no batch job (no _job.json); pick a new --output")
        if {"model_names": [], **json.loads(job.read_text())} != asdict(spec):  # a job from before model_names
            raise ValueError(
                f"--output {out} holds a different job ({job.read_text().strip()}); resume it with the same "
                "arguments, or pick a new --output"
            )
    (out / SCORES).mkdir(parents=True, exist_ok=True)
    if not job.exists():
        write_text_atomically(json.dumps(asdict(spec), allow_nan=False), job)


def record_identities(out: Path, identities: dict[str, str]) -> None:
    """Write which model identities score this job (OUT/_model.json, at its first scoring run), or check that a
    resumed run scores with the same ones: a job's shards never mix two models' scores. ValueError naming both."""
    recorded = out / MODEL
    if recorded.exists():
        before = json.loads(recorded.read_text())["model_identity"]
        if before != identities:
            raise ValueError(
                f"--output {out} was scored by {_listed(before)}, but the model now is {_listed(identities)}: "
                f"resume against the same model (--expect-model {','.join(before.values())} picks its servers "
                "from a mixed fleet), or pick a new --output"
            )
        return
    write_text_atomically(json.dumps({"model_identity": identities}, allow_nan=False), recorded)


def _listed(identities: dict[str, str]) -> str:
    return ", ".join(identities.values())


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


def shard_table(
    rows: list[Row],
    scores: np.ndarray,
    errors: dict[int, str],
    extra: dict[str, np.ndarray],
    names: Sequence[str] = ("score",),
) -> pa.Table:
    """A scored shard: its rows (where they are in their inputs too), scores ((N,), or (N, models) with a column
    name each in ``names``), errors by position in the shard, and the embeddings by column when asked."""
    by_model = np.asarray(scores).reshape(len(rows), -1)
    if by_model.shape[1] != len(names):
        raise ValueError(f"{by_model.shape[1]} scores a row for the columns {', '.join(names)}")
    columns: dict[str, Any] = {
        "row": pa.array([r.index for r in rows], pa.int64()),
        "id": pa.array([r.id for r in rows], pa.string()),
        "group": pa.array([r.group for r in rows], pa.string()),
        "prompt": pa.array([r.prompt for r in rows], pa.string()),
    }
    for k, name in enumerate(names):
        columns[name] = pa.array(
            [None if i in errors else float(s) for i, s in enumerate(by_model[:, k])], pa.float32()
        )
    columns |= {
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
    """Ranks and probabilities within groups (per model's score column), from the shard files; the output parts,
    errors.jsonl, _SUCCESS."""
    files = sorted((out / SCORES).glob("shard-*.parquet"))
    names = score_columns(spec.model_names)
    keys = pa.concat_tables([pq.read_table(f, columns=["row", "group", *names]) for f in files])
    rows = keys.column("row").to_numpy()
    groups = keys.column("group").to_pylist()
    ranked = {}  # score column -> (rank, probability) over every row; NaN scores for failed rows
    for name in names:
        ranked[name] = group_ranks(groups, keys.column(name).to_numpy(zero_copy_only=False).astype(np.float64))
    by_row = {int(r): k for k, r in enumerate(rows)}
    errors, n_ok = [], 0
    for f in files:
        table = pq.read_table(f)
        positions = np.array([by_row[int(r)] for r in table.column("row").to_pylist()], np.int64)
        failed = np.array([e is not None for e in table.column("error").to_pylist()], bool)
        errors += table.filter(pa.array(failed)).select(list(ERROR_FIELDS)).to_pylist()
        kept = table.filter(pa.array(~failed)).drop(["error", "file", "position"])
        positions = positions[~failed]
        for name in names:
            rank, probability = ranked[name]
            suffix = name.removeprefix("score")
            kept = kept.append_column(f"rank{suffix}", pa.array(rank[positions], pa.int32()))
            kept = kept.append_column(f"probability{suffix}", pa.array(probability[positions], pa.float32()))
        n_ok += kept.num_rows
        write_table_atomically(kept, out / f.name.replace("shard-", "part-"))
    write_text_atomically("".join(json.dumps(e, allow_nan=False) + "\n" for e in errors), out / "errors.jsonl")
    first = keys.column(names[0]).to_numpy(zero_copy_only=False).astype(np.float64)  # failed rows fail every model
    manifest = {
        "rows": int(len(rows)),
        "scored": n_ok,
        "errors": len(errors),
        "groups": len(set(g for g, s in zip(groups, first) if not np.isnan(s))),
        "parts": len(files),
        "model": spec.model,
        **({"model_names": list(spec.model_names), "score_columns": names} if spec.model_names else {}),
        **(json.loads((out / MODEL).read_text()) if (out / MODEL).exists() else {}),
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
