"""The ``pickscore train`` and ``pickscore eval`` subcommands (parsers stay light; torch loads on run)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pickscore.training.config import OVERRIDABLE, TrainConfig, preset_names


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune or train a scorer with the PickScore objective",
        description="Train with the PickScore loss on Pick-a-Pic-format data (DIR/<split>/*.parquet). Resumes from "
                    "OUT/last when it exists. Writes OUT/last (resumable), OUT/best (best validation accuracy), "
                    "OUT/log.jsonl and OUT/curves.png. Distributed: --nproc N, or torchrun --nproc_per_node N -m pickscore.cli train ...")
    p.add_argument("--model", metavar="REF", help="starting checkpoint (any model reference); omit to train the preset's architecture from scratch")
    p.add_argument("--data", required=True, type=Path, metavar="DIR", help="dataset directory with train and validation_unique splits")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="run directory: checkpoints, log and plot")
    p.add_argument("--preset", metavar="NAME", help=f"settings to start from: {', '.join(preset_names())}, or a JSON file")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="processes on this machine (DDP: gloo on CPU, NCCL on GPU)")
    defaults = TrainConfig()
    for f in OVERRIDABLE:
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(flag, type=kind, default=None, metavar=f.type.upper(),
                           help=f"{f.metadata['help']} (default {getattr(defaults, f.name)})")
    p.set_defaults(func=_cmd_train)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="tie-aware preference accuracy on a dataset",
        description="Tie-aware accuracy as in the paper: a tie is predicted when |p0 - p1| <= threshold, the threshold "
                    "is chosen on validation_unique and applied to test_unique; 1 point per right answer, 0.5 when "
                    "either side is a tie. Prints the model beside the baselines.")
    p.add_argument("--model", required=True, metavar="REF", help="the model to evaluate (any model reference)")
    p.add_argument("--data", required=True, type=Path, metavar="DIR", help="dataset directory with validation_unique and test_unique")
    p.add_argument("--baseline", metavar="REF", help="also evaluate this model, e.g. the untrained starting checkpoint (zero-shot)")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="use at most N pairs per split (0: all)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write accuracy against the tie threshold to this PNG")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, ...")
    p.add_argument("--json", action="store_true", help='print {"accuracy": ..., "threshold": ..., ...} instead of a table')
    p.set_defaults(func=_cmd_eval)


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = {f.name: getattr(args, f.name) for f in OVERRIDABLE}
    from pickscore.training.config import load_config

    cfg = load_config(args.preset, overrides)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "pickscore.cli", *_without_nproc(args.argv)]
        return subprocess.call(cmd)
    from pickscore.training.loop import train

    state = train(cfg, args.model, args.data, args.out)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"step": state["step"], "best_accuracy": state["best_accuracy"], "skipped": state["skipped"],
                          "out": str(args.out)}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pickscore.scorer import Scorer
    from pickscore.training.evaluate import evaluate, plot_threshold_curves

    results = {}
    for name, ref in (("model", args.model), ("baseline", args.baseline)):
        if ref:
            scorer = Scorer.from_pretrained(ref, device=args.device, dtype="fp32")
            results[name] = evaluate(scorer, args.data, args.limit)
    if args.plot:
        plot_threshold_curves({(args.model if k == "model" else args.baseline): v for k, v in results.items()}, args.plot)
    summary = {k: v for k, v in results["model"].items() if k != "curves"}
    summary["model"] = args.model
    summary["random_baseline"] = 0.5
    if "baseline" in results:
        summary["baseline"] = {"model": args.baseline, **{k: v for k, v in results["baseline"].items() if k != "curves"}}
    if args.json:
        print(json.dumps(summary))
        return 0
    rows = [("random", "0.5000", "-")]
    rows += [(args.baseline, f"{r['accuracy']:.4f}", f"{r['threshold']:.3f}") for r in [results.get("baseline")] if r]
    rows.append((args.model, f"{summary['accuracy']:.4f}", f"{summary['threshold']:.3f}"))
    width = max(len(str(name)) for name, _, _ in rows)
    print(f"{'model':{width}s}  accuracy  threshold")
    for name, accuracy, threshold in rows:
        print(f"{str(name):{width}s}  {accuracy}    {threshold}")
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
