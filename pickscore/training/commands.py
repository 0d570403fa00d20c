"""The ``train``, ``eval`` and ``data synthetic`` subcommands (parsers stay light; torch loads on run)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pickscore.backends import add_backend_flags, backend_options
from pickscore.flags import add_flags, given, int_at_least
from pickscore.training.config import TrainConfig, preset_names
from pickscore.training.dials import (
    BEST_CHANGE,
    GENERATOR_NAMES,
    HELD_OUT_FRACTION,
    MAX_MODEL_PROMPTS,
    WORST_CHANGE,
)

INIT = "init"  # OUT/init: the untrained starting point written by `train --init-only`
DEFAULT_MODEL_PROMPTS, DEFAULT_IMAGES_PER_PROMPT = 40, 4  # `data synthetic --models`


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_data_parser(sub)
    _add_train_parser(sub)
    _add_eval_parser(sub)


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser(
        "data", help="make training data", description="Make training data in the Pick-a-Pic parquet layout."
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data_sub.add_parser(
        "synthetic",
        help="write a synthetic Pick-a-Pic dataset of drawn shapes, or fake text-to-image models' images",
        description="With --pairs: write DIR/<split>/part-00000.parquet for train, validation, test, "
        "validation_unique and test_unique: prompts describe drawn scenes, and the image matching more of its "
        "prompt is preferred (about 10% of pairs are ties). With --models: write DIR/prompts.txt and "
        "DIR/<model>/<prompt index>/<k>.png, the images of fake text-to-image models of known quality, for "
        "`pickscore evaluate-models` (DIR/models.json lists them best first). The same seed writes identical files.",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--pairs",
        type=int_at_least(1),
        metavar="N",
        help="write preference pairs: N pairs in train + validation + test (80/10/10 by prompt with the default "
        "--held-out); the *_unique splits repeat one pair per prompt of validation and test",
    )
    what.add_argument(
        "--models",
        type=_model_count,
        metavar="M",
        help=f"write the images of M fake text-to-image models (1 to {max(GENERATOR_NAMES)}), named by quality "
        "best first (3: generator-good, generator-fair, generator-poor): each image changes each of its prompt's "
        f"five scene attributes with the model's probability, {BEST_CHANGE} for the best to {WORST_CHANGE} for the "
        "worst, so the right ranking is known",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument(
        "--image-size",
        type=int_at_least(8),
        default=64,
        metavar="PX",
        help="side of the square PNG images, in pixels (default 64, at least 8)",
    )
    p.add_argument(
        "--row-group-size",
        type=int_at_least(1),
        metavar="ROWS",
        help="rows per parquet row group (default 256; with --pairs)",
    )
    p.add_argument(
        "--held-out",
        type=_held_out_fraction,
        metavar="FRACTION",
        help="fraction of pairs for each of validation and test, in (0, 0.5] (default 0.1; with --pairs); only "
        "~2,600 distinct prompts exist, so a set made only to evaluate on should use 0.5 to get "
        "~1,300 prompts in each *_unique split",
    )
    p.add_argument(
        "--prompts",
        type=int_at_least(1),
        metavar="N",
        help=f"distinct prompts, at most {MAX_MODEL_PROMPTS} (default {DEFAULT_MODEL_PROMPTS}; with --models)",
    )
    p.add_argument(
        "--images-per-prompt",
        type=int_at_least(1),
        metavar="K",
        help=f"images each model draws per prompt (default {DEFAULT_IMAGES_PER_PROMPT}; with --models)",
    )
    p.set_defaults(func=_cmd_data_synthetic, usage_error=p.error)


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune or train a scorer with the PickScore objective",
        description="Train with the PickScore loss on Pick-a-Pic-format data (DIR/<split>/*.parquet). Resumes from "
        "OUT/last when it exists. Writes OUT/last (resumable), OUT/best (best validation accuracy), "
        "OUT/log.jsonl and OUT/curves.png. Distributed: --nproc N, or torchrun --nproc_per_node N -m "
        "pickscore.cli train ... Every setting's default is the built-in one; a --preset changes it.",
    )
    p.add_argument(
        "--model",
        metavar="REF",
        help="starting checkpoint (any model reference); omit to train the preset's architecture from scratch",
    )
    p.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="dataset directory with train and validation_unique splits (required unless --init-only); "
        "validation_unique needs at least one labeled pair, as validation keeps OUT/best by its accuracy",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="run directory: checkpoints, log and plot")
    p.add_argument(
        "--preset", metavar="NAME", help=f"settings to start from: {', '.join(preset_names())}, or a JSON file"
    )
    p.add_argument(
        "--nproc",
        type=int_at_least(1),
        default=1,
        metavar="N",
        help="processes on this machine (DDP: gloo on CPU, NCCL on GPU)",
    )
    p.add_argument(
        "--init-only",
        action="store_true",
        help=f"write the untrained starting point (--model as loaded, or the preset's initial weights "
        f"for its --seed) to OUT/{INIT} and stop: the zero-shot baseline for `pickscore eval "
        f"--baseline OUT/{INIT}`",
    )
    add_flags(p, TrainConfig)
    p.set_defaults(func=_cmd_train, usage_error=p.error)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="tie-aware preference accuracy on a dataset",
        description="Tie-aware accuracy as in the paper: a tie is predicted when |p0 - p1| <= threshold, the threshold "
        "is chosen on validation_unique and applied to test_unique; 1 point per right answer, 0.5 when "
        "either side is a tie. Each scorer scores by its own rule (PickScore, CLIP, HPS v2, ImageReward, the "
        "aesthetic predictor) and is loaded alone, freed before the next. Prints the paper's table, best first: "
        "every --model and --baseline, random choice (0.5) and, when DIR/agreement.json exists (`pickscore collect "
        "export` writes it), people: how well one person's choice predicts another's for the same pair, scored "
        "with the same points. Any model reference works, ONNX exports included, so an fp16 or int8 export can be "
        "compared with its checkpoint.",
    )
    p.add_argument(
        "--model",
        required=True,
        action="append",
        metavar="REF",
        help="the model to evaluate (any model reference, an ONNX export included); repeat it to compare several "
        "side by side on the same pairs and thresholds' rule",
    )
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="DIR",
        help="dataset directory with validation_unique and test_unique (and agreement.json for the people row)",
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="REF",
        help="also evaluate this model, e.g. the untrained start written by `train --init-only` (repeatable)",
    )
    p.add_argument(
        "--limit", type=int_at_least(0), default=0, metavar="N", help="use at most N pairs per split (0: all)"
    )
    p.add_argument("--plot", type=Path, metavar="PNG", help="write accuracy against the tie threshold to this PNG")
    add_backend_flags(p, dtype_default="fp32")
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"accuracy": ..., "threshold": ..., ...} of the first --model instead of a table, with '
        '"ranking" (the table\'s rows, best first) and "human_agreement" (the people row, when DIR/agreement.json '
        "exists)",
    )
    p.set_defaults(func=_cmd_eval)


def _held_out_fraction(text: str) -> float:
    """An argparse type: a float in (0, 0.5], refused as a usage error otherwise."""
    value = float(text)
    if not 0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5], got {value}")
    return value


def _model_count(text: str) -> int:
    """An argparse type: how many fake generators ``data synthetic --models`` can name (1 to 5)."""
    value = int(text)
    if value not in GENERATOR_NAMES:
        raise argparse.ArgumentTypeError(f"must be 1 to {max(GENERATOR_NAMES)}, got {value}")
    return value


def _cmd_data_synthetic(args: argparse.Namespace) -> int:
    from pickscore.training.synthetic import write_synthetic, write_synthetic_models

    if args.models is not None:
        if args.held_out is not None or args.row_group_size is not None:
            args.usage_error("--held-out and --row-group-size write preference pairs: use them with --pairs")
        prompts = DEFAULT_MODEL_PROMPTS if args.prompts is None else args.prompts
        if prompts > MAX_MODEL_PROMPTS:
            args.usage_error(f"argument --prompts: must be at most {MAX_MODEL_PROMPTS}, got {prompts}")
        gens = write_synthetic_models(
            args.out,
            models=args.models,
            prompts=prompts,
            images_per_prompt=DEFAULT_IMAGES_PER_PROMPT if args.images_per_prompt is None else args.images_per_prompt,
            seed=args.seed,
            image_size=args.image_size,
            progress=True,
        )
        names = ", ".join(g.name for g in gens)
        print(f"wrote {names} (best first), {prompts} prompts, to {args.out}", file=sys.stderr)
        return 0
    if args.prompts is not None or args.images_per_prompt is not None:
        args.usage_error("--prompts and --images-per-prompt write models' images: use them with --models")
    written = write_synthetic(
        args.out,
        pairs=args.pairs,
        seed=args.seed,
        image_size=args.image_size,
        row_group_size=256 if args.row_group_size is None else args.row_group_size,
        held_out=HELD_OUT_FRACTION if args.held_out is None else args.held_out,
        progress=True,
    )
    print(f"wrote {len(written)} splits to {args.out}", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pickscore.training.config import load_config

    cfg = load_config(args.preset, given(args, TrainConfig))
    if args.init_only:
        return _write_init(cfg, args)
    if args.data is None:
        args.usage_error("the following arguments are required: --data (unless --init-only)")
    from pickscore.training.loop import check_run, train

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        check_run(cfg, args.data, args.out, args.nproc)  # what would fail in every process, said once, before any
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "pickscore.cli",
            *_without_nproc(args.argv),
        ]
        return subprocess.call(cmd)
    state = train(cfg, args.model, args.data, args.out)
    if int(os.environ.get("RANK", 0)) == 0:
        print(
            json.dumps(
                {
                    "step": state["step"],
                    "best_accuracy": state["best_accuracy"],
                    "skipped": state["skipped"],
                    "out": str(args.out),
                },
                allow_nan=False,
            )
        )
    return 0


def _write_init(cfg: TrainConfig, args: argparse.Namespace) -> int:
    from pickscore.model.checkpoint import save
    from pickscore.training.loop import initial_model

    out = save(initial_model(cfg, args.model), args.out / INIT)
    print(json.dumps({"step": 0, "out": str(out)}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pickscore.training.evaluate import evaluate_refs, human_agreement, plot_threshold_curves, ranking

    refs = list(dict.fromkeys([*args.baseline, *args.model]))  # baselines first, as --json's "models" lists them
    people = human_agreement(args.data)  # read first: a malformed file fails before any model loads
    results = evaluate_refs(refs, args.data, args.limit, **backend_options(args))
    if args.plot:
        plot_threshold_curves(results, args.plot)
    plain = {ref: {k: v for k, v in r.items() if k != "curves"} for ref, r in results.items()}
    first = args.model[0]
    table = ranking(plain, people)
    summary = {**plain[first], "model": first, "random_baseline": 0.5, "ranking": table}
    if args.baseline:
        summary["baseline"] = {"model": args.baseline[0], **plain[args.baseline[0]]}
    if len(refs) > 1:  # every model and baseline, baselines first
        summary["models"] = [{"model": ref, **plain[ref]} for ref in refs]
    if people is not None:
        summary["human_agreement"] = people
        if people["rate"] is None:
            print(f"no people row: {people['file']}: {people['note']}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, allow_nan=False))
        return 0
    width = max(len(row["name"]) for row in table)
    print(f"{'model':{width}s}  accuracy  threshold")
    for row in table:
        threshold = "-" if row["threshold"] is None else f"{row['threshold']:.3f}"
        print(f"{row['name']:{width}s}  {row['accuracy']:.4f}    {threshold}")
    if people is not None and people["rate"] is not None:
        print(
            f"\npeople: one person's choice for a pair scored against another's, as a model's is (1 same, 0.5 when "
            f"one is a tie, 0 opposite): {people['comparisons']} comparisons on {people['pairs']} pairs "
            f"({people['file']})"
        )
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line minus --nproc, for the processes torchrun starts."""
    out, skip = [], False
    for arg in argv:
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        out.append(arg)
    return out
