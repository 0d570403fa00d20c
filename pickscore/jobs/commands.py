"""The ``batch``, ``evaluate-models`` and ``compare-selectors`` subcommands (parsers stay light; torch loads on run)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pickscore.backends import add_backend_flags, backend_options
from pickscore.datasets.image_sets import IMAGE_EXTENSIONS
from pickscore.flags import int_at_least
from pickscore.places import add_place_flags, add_scoring_flags, add_where_flags, check_model_name
from pickscore.tls import add_client_flags, connection


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_batch_parser(sub)
    _add_evaluate_models_parser(sub)
    _add_compare_selectors_parser(sub)


def _add_batch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="score and rank a dataset of (prompt, image) rows into Parquet, resumably",
        description="Score every row of the inputs and rank the rows of each group (default: one group per "
        "prompt). Inputs: Parquet (prompt + image or image_path, optional group and id; Pick-a-Pic's caption/"
        "jpg_0/jpg_1 as is), WebDataset .tar shards (KEY.jpg|png|webp + KEY.txt or KEY.json), or a directory "
        "with manifest.jsonl. Output: DIR/part-NNNNN.parquet (id, group, prompt, score, rank, probability "
        "within the group; embeddings with --embeddings; with several --model-name a,b: score_a, rank_a, "
        "probability_a, score_b, ... each model's own), DIR/errors.jsonl (a line per row that could not be "
        "scored: row, the input file and position in it, id, and the reason as error) and DIR/_SUCCESS "
        "(counts). Killed at any point, the same command with --resume continues where it stopped and ends with "
        "the same rows as an uninterrupted run.",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories or globs")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (new, or this job's with --resume)")
    add_where_flags(p, several=True)
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
    check_model_name(args)
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
        model_name=args.model_name,
        expect_model=args.expect_model,
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


def _add_evaluate_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate-models",
        help="compare text-to-image models by PickScore: mean scores, win rates, Elo, best-of-N",
        description="The paper's model evaluation (Kirstain et al. 2023, sections 4-5). Score every model's images "
        "for the same prompts, then report per model: the mean PickScore (each prompt weighs the same) with a "
        "95% bootstrap interval over prompts; pairwise win rates (per prompt, a model wins when its best image "
        "outscores the other's best; ties count half); Elo ratings fitted to those per-prompt games by maximum "
        "likelihood (Bradley-Terry; scale 400, mean 1000; one virtual tie per pair keeps an undefeated model "
        "finite), which rank the models; and the expected score of the best of N random images of a prompt "
        "against one random image, computed exactly. Bad images are skipped and listed, not fatal. With --server and "
        "several --model-name a,b, each of the servers' models scores every image (one request, one decode) and the "
        "report compares the scoring functions: the models ranked by each side by side, then each one's tables "
        "(report.json: scorers, a list of what one scorer's report holds).",
    )
    p.add_argument(
        "--prompts",
        required=True,
        type=Path,
        metavar="FILE",
        help='the prompts: a text file with one prompt a line, or JSONL (.jsonl) with {"prompt": ..., "id": ...} '
        "a line; a prompt's index is its position (0 first)",
    )
    p.add_argument(
        "--images",
        required=True,
        nargs="+",
        metavar="NAME=PATH",
        help="one text-to-image model's images for those prompts, per model: a directory PATH/<prompt index>/"
        f"<any name>{{{','.join(IMAGE_EXTENSIONS)}}} (several images a prompt allowed) or a Parquet file with "
        "columns prompt (the text, as in --prompts) or prompt_index, and image (encoded bytes); PATH alone is "
        "named after its last component, so `--images gens/generator-*` works",
    )
    add_place_flags(p, several=True)
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="also write DIR/report.json (every statistic, per-prompt best scores, skipped images), DIR/report.md "
        "(the tables) and DIR/report.png (win-rate matrix and mean scores with their intervals)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object instead of markdown")
    p.add_argument(
        "--bootstrap",
        type=int_at_least(0),
        default=1000,
        metavar="B",
        help="bootstrap resamples of the prompts behind the 95%% intervals (default 1000; 0: no intervals)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the bootstrap resamples (default 0); same seed, same report",
    )
    p.add_argument(
        "--best-of",
        type=_sizes,
        default=(1, 2, 4, 8),
        metavar="N,N,...",
        help="the N of the best-of-N table (default 1,2,4,8); an N is reported for a model over the prompts with "
        "at least N scored images, and left out where none has",
    )
    p.set_defaults(func=_cmd_evaluate_models)


def _sizes(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive integers, returned sorted without repeats."""
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return tuple(values)


def _cmd_evaluate_models(args: argparse.Namespace) -> int:
    from pickscore.jobs.evaluate_models import evaluate_models
    from pickscore.jobs.model_report import markdown, plot

    report = evaluate_models(args)
    for item in report["skipped"]:
        print(
            f"skipped: {item['model']}: prompt {item['prompt_index']}: {item['image']}: {item['error']}",
            file=sys.stderr,
        )
    text = markdown(report, "report.json" if args.out else None)
    print(json.dumps(report, ensure_ascii=False, allow_nan=False) if args.json else text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1, allow_nan=False) + "\n")
        (args.out / "report.md").write_text(text + "\n")
        plot(report, args.out / "report.png")
        print(f"wrote {args.out}/report.json, report.md, report.png", file=sys.stderr)
    return 0


def _add_compare_selectors_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare-selectors",
        help="which scorer picks the best of N images: a judge (a scorer or people's choices) compares their picks",
        description="The paper's selection experiment (Kirstain et al. 2023, section 5). For every prompt, each "
        "selector picks one of its N candidate images (a scorer its highest-scoring one, random one at random), "
        "and a judge compares the picks of every two selectors: a scorer (--judge: the pick it scores higher wins) "
        "or people's choices (--judge-choices: rows naming two images by content). Reports, for every two "
        "selectors A and B, how often the judge prefers A's pick (judge ties and identical picks count half) with "
        "a 95% percentile bootstrap interval over prompts, and the prompts where they picked the same image, the "
        "judge tied, or nobody judged the two picks. In-process scorers are loaded one at a time.",
    )
    p.add_argument(
        "--prompts",
        required=True,
        type=Path,
        metavar="FILE",
        help='the prompts: a text file with one prompt a line, or JSONL (.jsonl) with {"prompt": ..., "id": ...} '
        "a line, as evaluate-models reads them",
    )
    p.add_argument(
        "--images",
        required=True,
        nargs="+",
        metavar="NAME=PATH",
        help="the candidates, in evaluate-models' layouts: a directory PATH/<prompt index>/<any name>"
        f"{{{','.join(IMAGE_EXTENSIONS)}}} or a Parquet file (prompt or prompt_index, image); several sets are "
        "pooled, so a prompt's candidates are every set's images for it (e.g. `--images gens/generator-*`)",
    )
    p.add_argument(
        "--selector",
        required=True,
        action="append",
        metavar="NAME=REF",
        help="a selector (repeatable), named NAME in the report: REF is a model reference (any kind: PickScore, "
        "CLIP, HPS v2, ImageReward, the aesthetic predictor, an ONNX export), or with --server the name of one of "
        "the servers' models; REF random picks uniformly at random (seeded by --seed and NAME). A selector "
        "random=random is added unless one picks at random",
    )
    judge = p.add_mutually_exclusive_group(required=True)
    judge.add_argument(
        "--judge",
        metavar="REF",
        help="a scorer as the judge (REF as --selector's; a selector's REF is not loaded again): of two picks, the "
        "one it scores higher is preferred, equal scores are a tie",
    )
    judge.add_argument(
        "--judge-choices",
        metavar="PATH",
        help="people's choices as the judge: a Pick-a-Pic-layout Parquet file (caption, jpg_0, jpg_1, label_0, "
        "label_1), a directory or glob of them, or a `pickscore collect export` directory (its train, validation "
        "and test splits). A row judges its two images, matched to the picks by the SHA-256 of their bytes, for "
        "its caption, matched to the prompt's text; several rows on one pair count by their mean; two picks no row "
        "judges are reported as unjudged",
    )
    p.add_argument(
        "--server",
        metavar="ADDRESS",
        help="score on running `pickscore serve` servers instead of loading models here: HOST:PORT (gRPC) or "
        "http[s]://HOST:PORT, several separated by commas; each --selector and --judge REF then names one of "
        "their models",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the random selectors' picks and of the bootstrap resamples (default 0); same seed, same report",
    )
    p.add_argument(
        "--bootstrap",
        type=int_at_least(0),
        default=1000,
        metavar="B",
        help="bootstrap resamples of the prompts behind the 95%% intervals (default 1000; 0: no intervals)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="also write DIR/report.json (every comparison, each prompt's picks, skipped images), DIR/report.md "
        "and DIR/report.png (the comparisons as a matrix)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object instead of markdown")
    add_scoring_flags(p)
    p.set_defaults(func=_cmd_compare_selectors)


def _cmd_compare_selectors(args: argparse.Namespace) -> int:
    from pickscore.jobs.selection import compare_selectors, markdown, plot

    report = compare_selectors(args)
    for item in report["skipped"]:
        print(
            f"skipped: {item['by']}: prompt {item['prompt_index']}: {item['image']}: {item['error']}", file=sys.stderr
        )
    text = markdown(report, "report.json" if args.out else None)
    print(json.dumps(report, ensure_ascii=False, allow_nan=False) if args.json else text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1, allow_nan=False) + "\n")
        (args.out / "report.md").write_text(text + "\n")
        plot(report, args.out / "report.png")
        print(f"wrote {args.out}/report.json, report.md, report.png", file=sys.stderr)
    return 0
