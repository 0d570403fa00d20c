"""The ``export onnx|tensorrt|triton`` subcommands, and ``precision``, which measures what a lower precision (a torch
dtype or an export) keeps of fp32's ranking and how fast it runs (parsers stay light; torch and onnx load on run)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pickscore.backends.manifest import PRECISIONS
from pickscore.flags import int_at_least


def add_parsers(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help="export a model to ONNX, TensorRT or a Triton model repository",
        description="Export a model for other runtimes, verified against the original.",
    )
    kinds = export.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    onnx = kinds.add_parser(
        "onnx",
        help="image and text towers as ONNX graphs (DIR is a --model reference)",
        description="Write DIR/image.onnx and DIR/text.onnx (symbolic batch axis) with the model's kind, "
        "preprocessing, tokenizer and the logit_scale its scores use, so DIR works as --model for score, rank, "
        "eval and serve. PickScore, any CLIP and HPS v2 export L2-normalised embeddings; the LAION aesthetic "
        "predictor its score from the image tower (the prompt is ignored). ImageReward is refused: its score is a "
        "joint forward pass over each (prompt, image) pair, not two towers meeting in a dot product; serve it "
        "with the torch backend. Verified with ONNX Runtime.",
    )
    onnx.add_argument("--model", required=True, metavar="REF", help="model reference to export (as for score)")
    onnx.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (replaced atomically)")
    onnx.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="fp32 (default); fp16 (half-precision weights and compute, float32 in and out); "
        "int8 (dynamic quantisation of the weights)",
    )
    onnx.add_argument(
        "--min-agreement",
        type=float,
        default=0.99,
        metavar="FRACTION",
        help="fp16/int8: refuse to write when fewer than this fraction of image pairs in best-of-8 "
        "sets keep their fp32 order (default 0.99)",
    )
    onnx.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check against torch")
    onnx.set_defaults(func=_cmd_export_onnx)

    trt = kinds.add_parser(
        "tensorrt",
        help="build TensorRT engines for an ONNX export (GPU + TensorRT needed)",
        description="Build and cache TensorRT engines for an ONNX export through ONNX Runtime's "
        "TensorRT provider, and verify them; says what is missing where it cannot.",
    )
    trt.add_argument(
        "--model", required=True, metavar="ONNX_DIR", help="a directory written by `pickscore export onnx`"
    )
    trt.add_argument(
        "--max-batch-size", type=int_at_least(1), default=32, help="largest batch of the profiles (default 32)"
    )
    trt.set_defaults(func=_cmd_export_tensorrt)

    triton = kinds.add_parser(
        "triton",
        help="a Triton Inference Server model repository",
        description="Write REPO with pickscore (ensemble: PROMPT, IMAGE -> SCORE), "
        "pickscore_image and pickscore_text (ONNX) and two Python-backend steps "
        "that use this package. The kinds `export onnx` takes (PickScore/CLIP, HPS v2, the aesthetic "
        "predictor); ImageReward is refused.",
    )
    triton.add_argument("--model", required=True, metavar="REF", help="model reference, or an ONNX export to reuse")
    triton.add_argument(
        "--out", required=True, type=Path, metavar="REPO", help="repository directory (replaced atomically)"
    )
    triton.add_argument("--precision", default="fp32", choices=PRECISIONS, help="ONNX precision (default fp32)")
    triton.add_argument(
        "--max-batch-size", type=int_at_least(1), default=32, help="towers' max_batch_size (default 32)"
    )
    triton.add_argument(
        "--max-images-per-request",
        type=int_at_least(1),
        default=256,
        help="the ensemble's max_batch_size (default 256)",
    )
    triton.add_argument(
        "--max-queue-delay-us",
        type=int_at_least(0),
        default=5000,
        help="dynamic_batching max_queue_delay_microseconds (default 5000)",
    )
    triton.add_argument(
        "--instances", type=int_at_least(1), default=1, help="instance_group count per tower (default 1)"
    )
    triton.add_argument(
        "--tensorrt", action="store_true", help="add the TensorRT accelerator (FP16, engine cache) to the ONNX towers"
    )
    triton.set_defaults(func=_cmd_export_triton)

    precision = sub.add_parser(
        "precision",
        help="which precision to serve a model in here: each path's speed and rank agreement with fp32",
        description="Score the same best-of-8 sets of drawn scenes with the model in torch fp32 and in each "
        "candidate (lower torch dtypes, ONNX exports), and print each path's images/s (the towers, in this "
        "process), its rank agreement with fp32 (the fraction of image pairs within a set ordered alike: the "
        "export check's measure), its largest score difference, and the fastest path that keeps --min-agreement, "
        "with the command that serves it. Lower precisions change scores: check a model here before serving it "
        "with --dtype bf16 or fp16.",
    )
    precision.add_argument("--model", required=True, metavar="REF", help="model reference (as for score)")
    precision.add_argument(
        "--candidates",
        default="",
        metavar="LIST",
        help="comma-separated: bf16, fp16 (torch, on --device) and directories of ONNX exports "
        "(default: bf16 on a CPU; bf16,fp16 on a GPU)",
    )
    precision.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N")
    precision.add_argument(
        "--sets",
        type=int_at_least(2),
        default=8,
        help="best-of-8 sets of drawn scenes (default 8: the export check's); all count for rank agreement, all "
        "but the first (a warm-up) for images/s",
    )
    precision.add_argument(
        "--min-agreement",
        type=float,
        default=0.99,
        metavar="FRACTION",
        help="the rank agreement a path must keep to be chosen (default 0.99, as the export check)",
    )
    precision.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    precision.set_defaults(func=_cmd_precision)


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from pickscore.exporter.onnx import export_onnx

    manifest = export_onnx(
        args.model, args.out, precision=args.precision, verify=not args.no_verify, min_agreement=args.min_agreement
    )
    print(
        f"wrote {args.out} ({args.precision}; verification: {manifest.get('verification', 'skipped')})", file=sys.stderr
    )
    return 0


def _cmd_precision(args: argparse.Namespace) -> int:
    from pickscore.backends.torch_backend import resolve_device
    from pickscore.exporter.precision import compare_paths, default_candidates, report

    device = str(resolve_device(args.device, "fp32")[0])
    candidates = [c for c in args.candidates.split(",") if c] or default_candidates(device)
    result = compare_paths(args.model, candidates, device, args.sets, args.min_agreement, progress=True)
    print(json.dumps(result) if args.json else report(result))
    return 0


def _cmd_export_tensorrt(args: argparse.Namespace) -> int:
    from pickscore.exporter.tensorrt import build_engines

    print(json.dumps(build_engines(args.model, args.max_batch_size)))
    return 0


def _cmd_export_triton(args: argparse.Namespace) -> int:
    from pickscore.exporter.triton import export_triton

    out = export_triton(
        args.model,
        args.out,
        precision=args.precision,
        max_batch_size=args.max_batch_size,
        max_images_per_request=args.max_images_per_request,
        max_queue_delay_us=args.max_queue_delay_us,
        tensorrt=args.tensorrt,
        instances=args.instances,
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0
