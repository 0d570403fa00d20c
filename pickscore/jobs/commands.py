"""The ``batch`` and ``evaluate-models`` subcommands (parsers stay light; torch loads on run)."""

from __future__ import annotations

import argparse
import json
import sys

from pickscore.backends import add_backend_flags, backend_options
from pickscore.flags import int_at_least
from pickscore.tls import add_client_flags, connection


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from pickscore.jobs import evaluate_models

    _add_batch_parser(sub)
    evaluate_models.add_parser(sub)


def _add_batch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="score and rank a dataset of (prompt, image) rows into Parquet, resumably",
        description="Score every row of the inputs and rank the rows of each group (default: one group per "
        "prompt). Inputs: Parquet (prompt + image or image_path, optional group and id; Pick-a-Pic's caption/"
        "jpg_0/jpg_1 as is), WebDataset .tar shards (KEY.jpg|png|webp + KEY.txt or KEY.json), or a directory "
        "with manifest.jsonl. Output: DIR/part-NNNNN.parquet (id, group, prompt, score, rank, probability "
        "within the group; embeddings with --embeddings), DIR/errors.jsonl (a line per row that could not be "
        "scored: row, the input file and position in it, id, and the reason as error) and DIR/_SUCCESS "
        "(counts). Killed at any point, the same command with --resume continues where it stopped and ends with "
        "the same rows as an uninterrupted run.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories or globs")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (new, or this job's with --resume)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", metavar="REF", help="score in this process with this model (demo, a directory, ...)")
    where.add_argument(
        "--server",
        metavar="ADDR[,ADDR...]",
        help="score on running `pickscore serve` instances: gRPC host:port, or http://host:port; rows are spread "
        "over all of them, with bounded requests in flight and retries on RESOURCE_EXHAUSTED/UNAVAILABLE",
    )
    p.add_argument("--resume", action="store_true", help="continue the job already in --output (same arguments)")
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run on Ray (pip install 'pickscore[ray]'): reading and decoding in CPU tasks, scoring in an actor "
        "pool (one scorer per GPU, else per --cpus-per-scorer CPUs); ADDRESS of a running cluster (e.g. auto, "
        "ray://head:10001), or none for a local instance. Same output as in-process; with --model only",
    )
    p.add_argument(
        "--cpus-per-scorer",
        type=int_at_least(1),
        default=1,
        metavar="N",
        help="with --ray on CPUs: CPUs each scoring actor takes (default 1)",
    )
    p.add_argument(
        "--shard-size",
        type=int_at_least(1),
        default=1024,
        metavar="N",
        help="rows per shard, the unit of work written atomically and of memory (default 1024)",
    )
    p.add_argument(
        "--embeddings",
        action="store_true",
        help="also write each row's image and text embedding (list<float32>), to re-score later without images "
        "(with --model only)",
    )
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=32, metavar="N", help="images per forward pass (default 32)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up on a server request after this long, retries included (default 600)",
    )
    p.add_argument("--json", action="store_true", help="print the _SUCCESS manifest as JSON")
    add_backend_flags(p)
    add_client_flags(p.add_argument_group("server security (with --server only)"))
    p.set_defaults(func=_cmd_batch)


def _cmd_batch(args: argparse.Namespace) -> int:
    if args.ray:
        if not args.model:
            raise ValueError("--ray scores with --model on the cluster's own workers, not on --server")
        from pickscore.jobs.ray_batch import run_batch_on_ray

        manifest = run_batch_on_ray(
            args.input,
            args.output,
            model=args.model,
            address=None if args.ray == "local" else args.ray,
            resume=args.resume,
            shard_size=args.shard_size,
            embeddings=args.embeddings,
            **backend_options(args),
            batch_size=args.batch_size,
            cpus_per_scorer=args.cpus_per_scorer,
        )
        return _report(args, manifest)
    from pickscore.jobs.batch import run_batch

    manifest = run_batch(
        args.input,
        args.output,
        model=args.model,
        servers=args.server.split(",") if args.server else (),
        resume=args.resume,
        shard_size=args.shard_size,
        embeddings=args.embeddings,
        **backend_options(args),
        batch_size=args.batch_size,
        timeout=args.timeout,
        **(connection(args) if args.server else {}),
    )
    return _report(args, manifest)


def _report(args: argparse.Namespace, manifest: dict) -> int:
    if args.json:
        print(json.dumps(manifest, allow_nan=False))
    else:
        print(
            f"{manifest['scored']} of {manifest['rows']} rows scored in {manifest['groups']} groups, "
            f"{manifest['errors']} errors (errors.jsonl) -> {args.output}",
            file=sys.stderr,
        )
    return 0
