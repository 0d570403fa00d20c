"""The ``score``, ``rank`` and ``convert`` subcommands: images against a prompt, on a model loaded here (``Scorer``)
or on running servers (``pickscore.places``), and any model reference rewritten in this project's layout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pickscore.datasets.image_sets import IMAGE_EXTENSIONS, image_files
from pickscore.errors import InvalidInput, PickScoreError
from pickscore.flags import int_at_least
from pickscore.places import MODEL_HELP, add_place_flags


def add_parsers(sub: argparse._SubParsersAction) -> None:
    score = sub.add_parser(
        "score",
        help="score each image against a prompt",
        description="Print the PickScore of each image for the prompt, in input order.",
    )
    _scoring_flags(score)
    score.set_defaults(func=_cmd_score)

    rank = sub.add_parser(
        "rank",
        help="rank images for a prompt, best first",
        description="Rank images for a prompt: best first, with scores and softmax probabilities "
        "over the candidates (the probability a person prefers each).",
    )
    _scoring_flags(rank)
    rank.add_argument("--top-k", type=int_at_least(1), default=None, metavar="K", help="print only the K best images")
    rank.set_defaults(func=_cmd_rank)

    convert = sub.add_parser(
        "convert",
        help="write a model in this project's (open_clip) layout",
        description="Load any model reference and write it as an open_clip directory "
        "with preprocessor_config.json, loadable with --model DIR.",
    )
    convert.add_argument("--model", required=True, metavar="REF", help=MODEL_HELP)
    convert.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    convert.set_defaults(func=_cmd_convert)


def _scoring_flags(p: argparse.ArgumentParser) -> None:
    add_place_flags(p)
    p.add_argument("--prompt", required=True, help="the text prompt the images were generated for")
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help=f"image files, or directories searched recursively for {' '.join(IMAGE_EXTENSIONS)}",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="report undecodable or oversized images per item and score the rest, instead of failing",
    )


def _expand(paths: Sequence[str]) -> list[Path]:
    """Files as given; directories expanded recursively (sorted) to files with image extensions."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(image_files(p))
        else:
            out.append(p)
    return out


def _score_files(args: argparse.Namespace) -> tuple[list[Path], np.ndarray, dict[int, PickScoreError]]:
    from pickscore.places import place_from_args

    files = _expand(args.images)
    if not files:
        raise InvalidInput(f"no image files found in {' '.join(args.images)}")
    with place_from_args(args) as place:
        args.model = place.model  # the JSON names the model, a server's as a local run's
        scores, errors = place.score_all(args.prompt, files, skip_invalid=args.skip_invalid, progress=True)
    if len(errors) == len(files):
        raise InvalidInput(f"none of the {len(files)} images could be scored; first: {errors[0]}")
    return files, scores, errors


def _cmd_score(args: argparse.Namespace) -> int:
    files, scores, errors = _score_files(args)
    results = [{"image": str(f), "score": float(s)} for i, (f, s) in enumerate(zip(files, scores)) if i not in errors]
    _emit(args, results, errors, files, columns=("score",))
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from pickscore.model.scoring import rank_scores

    files, scores, errors = _score_files(args)
    valid = [i for i in range(len(files)) if i not in errors]
    ranking = rank_scores(scores[valid], args.top_k)  # softmax over the valid candidates only
    results = [
        {
            "image": str(files[valid[j]]),
            "score": ranking.scores[j],
            "probability": ranking.probabilities[j],
            "rank": r + 1,
        }
        for r, j in enumerate(ranking.order)
    ]
    _emit(args, results, errors, files, columns=("rank", "score", "probability"))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pickscore.model.checkpoint import resolve, save

    out = save(resolve(args.model), args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _emit(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    errors: dict[int, PickScoreError],
    files: list[Path],
    columns: tuple[str, ...],
) -> None:
    error_items = [{"image": str(files[i]), "error": str(e)} for i, e in sorted(errors.items())]
    if args.json:
        doc: dict[str, Any] = {"model": args.model, "prompt": args.prompt, "results": results}
        if args.skip_invalid:
            doc["errors"] = error_items
        print(json.dumps(doc, ensure_ascii=False))
        return
    header = [*columns, "image"]
    rows = [[_fmt(r[c]) for c in columns] + [r["image"]] for r in results]
    widths = [max(len(h), *(len(row[k]) for row in rows)) for k, h in enumerate(header)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for item in error_items:
        print(f"skipped: {item['error']}", file=sys.stderr)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
