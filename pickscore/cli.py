"""The ``pickscore`` command.

    pickscore score --model REF --prompt TEXT [--json] IMAGE_OR_DIR...
    pickscore rank  --model REF --prompt TEXT [--top-k K] [--json] IMAGE_OR_DIR...
    pickscore convert --model REF --out DIR
    pickscore data synthetic --out DIR --pairs N [--seed S] [--image-size PX] [--held-out F]
    pickscore train --data DIR --out DIR [--model REF] [--preset NAME] [overrides]
    pickscore eval --model REF --data DIR [--baseline REF] [--json]
    pickscore export onnx|tensorrt|triton --model REF ...
    pickscore serve [--model REF] [--port 8001] [--metrics-port 9090] [settings]
    pickscore score|rank --server HOST:PORT ...        score on a running server

Exit status: 0 on success, 1 when the model or an input was bad (the message names it), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pickscore import __version__
from pickscore.errors import InvalidInput, PickScoreError
from pickscore.model.preprocess import DEFAULT_MAX_PIXELS
from pickscore.training.commands import add_eval_parser, add_train_parser

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _model_flags(p: argparse.ArgumentParser, server: bool = False) -> None:
    where = p.add_mutually_exclusive_group(required=True) if server else p
    where.add_argument("--model", required=not server, metavar="REF",
                   help="model reference: demo (the small model bundled with the package), a Hugging Face CLIP directory (e.g. a downloaded PickScore_v1), "
                        "an open_clip directory, a checkpoint written by this project, or a hub id "
                        "such as yuvalkirstain/PickScore_v1 (taken from the local Hugging Face cache)")
    if server:
        where.add_argument("--server", metavar="HOST:PORT",
                           help="score on a running `pickscore serve` instead of loading a model here")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="compute precision; auto is bf16 on CUDA and fp32 on CPU")


def _scoring_flags(p: argparse.ArgumentParser) -> None:
    _model_flags(p, server=True)
    p.add_argument("--prompt", required=True, help="the text prompt the images were generated for")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help=f"image files, or directories searched recursively for {' '.join(IMAGE_EXTENSIONS)}")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--skip-invalid", action="store_true",
                   help="report undecodable or oversized images per item and score the rest, instead of failing")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16; local model only)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels than this, a guard against decompression bombs "
                        f"(default {DEFAULT_MAX_PIXELS}; local model only: a server applies its own limit)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="deadline of each server request (default 600; with --server only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pickscore",
        description="Score and rank text-to-image generations by predicted human preference (PickScore).",
    )
    parser.add_argument("--version", action="version", version=f"pickscore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = sub.add_parser("score", help="score each image against a prompt",
                           description="Print the PickScore of each image for the prompt, in input order.")
    _scoring_flags(score)
    score.set_defaults(func=_cmd_score)

    rank = sub.add_parser("rank", help="rank images for a prompt, best first",
                          description="Rank images for a prompt: best first, with scores and softmax probabilities "
                                      "over the candidates (the probability a person prefers each).")
    _scoring_flags(rank)
    rank.add_argument("--top-k", type=int, default=None, metavar="K", help="print only the K best images")
    rank.set_defaults(func=_cmd_rank)

    convert = sub.add_parser("convert", help="write a model in this project's (open_clip) layout",
                             description="Load any model reference and write it as an open_clip directory "
                                         "with preprocessor_config.json, loadable with --model DIR.")
    _model_flags(convert)
    convert.add_argument("--out", required=True, type=Path, help="output directory (replaced atomically)")
    convert.set_defaults(func=_cmd_convert)

    data = sub.add_parser("data", help="make training data",
                          description="Make training data in the Pick-a-Pic parquet layout.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    synthetic = data_sub.add_parser(
        "synthetic", help="write a synthetic Pick-a-Pic dataset of drawn shapes",
        description="Write DIR/<split>/part-00000.parquet for train, validation, test, validation_unique and "
                    "test_unique: prompts describe drawn scenes, and the image matching more of its prompt is "
                    "preferred (about 10% of pairs are ties). The same seed writes identical files.")
    synthetic.add_argument("--out", required=True, type=Path, metavar="DIR", help="dataset directory to write")
    synthetic.add_argument("--pairs", required=True, type=_int_at_least(1), metavar="N",
                           help="pairs in train + validation + test (80/10/10 by prompt with the default "
                                "--held-out); the *_unique splits repeat one pair per prompt of validation and test")
    synthetic.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    synthetic.add_argument("--image-size", type=_int_at_least(8), default=64, metavar="PX",
                           help="side of the square PNG images, in pixels (default 64, at least 8)")
    synthetic.add_argument("--row-group-size", type=_int_at_least(1), default=256, metavar="ROWS",
                           help="rows per parquet row group (default 256)")
    synthetic.add_argument("--held-out", type=_held_out_fraction, default=0.1, metavar="FRACTION",
                           help="fraction of pairs for each of validation and test, in (0, 0.5] (default 0.1); "
                                "only ~2,600 distinct prompts exist, so a set made only to evaluate on should "
                                "use 0.5 to get ~1,300 prompts in each *_unique split")
    synthetic.set_defaults(func=_cmd_data_synthetic)
    add_train_parser(sub)
    add_eval_parser(sub)

    _add_export_parser(sub)
    from pickscore.server.settings import Settings

    serve = sub.add_parser(
        "serve", help="run the gRPC scoring server",
        description="Serve pickscore.v1.ScoringService, the KServe v2 (Triton) inference protocol, gRPC health "
                    "and reflection on --port, and Prometheus metrics on --metrics-port. Every flag can also be set "
                    "by the PICKSCORE_* environment variable named in its help; flags win. SIGTERM drains: "
                    "NOT_SERVING, new requests refused with UNAVAILABLE, admitted ones finished, exit 0.")
    Settings.add_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    health = sub.add_parser(
        "health", help="check a server's gRPC health (container health checks)",
        description="Ask a server's grpc.health.v1 service and print its status; exit 0 when SERVING, 1 otherwise "
                    "(NOT_SERVING while warming up or draining, unreachable, unknown service).")
    health.add_argument("--server", default="localhost:8001", metavar="HOST:PORT",
                        help="server address (default localhost:8001)")
    health.add_argument("--service", default="", metavar="NAME",
                        help='health service to ask: "" (default) is readiness, SERVING only while requests are '
                             'taken; "liveness" is SERVING whenever the process answers, through warm-up and drain')
    health.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="deadline (default 5)")
    health.set_defaults(func=_cmd_health)
    return parser


def _cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.server) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                             timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _add_export_parser(sub) -> None:
    export = sub.add_parser("export", help="export a model to ONNX, TensorRT or a Triton model repository",
                            description="Export a model for other runtimes, verified against the original.")
    kinds = export.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    onnx = kinds.add_parser("onnx", help="image and text towers as ONNX graphs (DIR is a --model reference)",
                            description="Write DIR/image.onnx and DIR/text.onnx (symbolic batch axis, L2-normalised "
                                        "embeddings) with the model's preprocessing, tokenizer and logit_scale, so "
                                        "DIR works as --model for score, rank and serve. Verified with ONNX Runtime.")
    onnx.add_argument("--model", required=True, metavar="REF", help="model reference to export (as for score)")
    onnx.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory (replaced atomically)")
    onnx.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                      help="fp32 (default); fp16 (half-precision weights and compute, float32 in and out); "
                           "int8 (dynamic quantisation of the weights)")
    onnx.add_argument("--min-agreement", type=float, default=0.99, metavar="FRACTION",
                      help="fp16/int8: refuse to write when fewer than this fraction of image pairs in best-of-8 "
                           "sets keep their fp32 order (default 0.99)")
    onnx.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check against torch")
    onnx.set_defaults(func=_cmd_export_onnx)
    trt = kinds.add_parser("tensorrt", help="build TensorRT engines for an ONNX export (GPU + TensorRT needed)",
                           description="Build and cache TensorRT engines for an ONNX export through ONNX Runtime's "
                                       "TensorRT provider, and verify them; says what is missing where it cannot.")
    trt.add_argument("--model", required=True, metavar="ONNX_DIR", help="a directory written by `pickscore export onnx`")
    trt.add_argument("--max-batch-size", type=_int_at_least(1), default=32, help="largest batch of the profiles (default 32)")
    trt.set_defaults(func=_cmd_export_tensorrt)
    triton = kinds.add_parser("triton", help="a Triton Inference Server model repository",
                              description="Write REPO with pickscore (ensemble: PROMPT, IMAGE -> SCORE), pickscore_image "
                                          "and pickscore_text (ONNX) and two Python-backend steps that use this package.")
    triton.add_argument("--model", required=True, metavar="REF", help="model reference, or an ONNX export to reuse")
    triton.add_argument("--out", required=True, type=Path, metavar="REPO", help="repository directory (replaced atomically)")
    triton.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"], help="ONNX precision (default fp32)")
    triton.add_argument("--max-batch-size", type=_int_at_least(1), default=32, help="towers' max_batch_size (default 32)")
    triton.add_argument("--max-images-per-request", type=_int_at_least(1), default=256,
                        help="the ensemble's max_batch_size (default 256)")
    triton.add_argument("--max-queue-delay-us", type=_int_at_least(0), default=5000,
                        help="dynamic_batching max_queue_delay_microseconds (default 5000)")
    triton.add_argument("--instances", type=_int_at_least(1), default=1, help="instance_group count per tower (default 1)")
    triton.add_argument("--tensorrt", action="store_true",
                        help="add the TensorRT accelerator (FP16, engine cache) to the ONNX towers")
    triton.set_defaults(func=_cmd_export_triton)


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from pickscore.exporter.onnx import export_onnx

    manifest = export_onnx(args.model, args.out, precision=args.precision, verify=not args.no_verify,
                           min_agreement=args.min_agreement)
    print(f"wrote {args.out} ({args.precision}; verification: {manifest.get('verification', 'skipped')})", file=sys.stderr)
    return 0


def _cmd_export_tensorrt(args: argparse.Namespace) -> int:
    from pickscore.exporter.tensorrt import build_engines

    print(json.dumps(build_engines(args.model, args.max_batch_size)))
    return 0


def _cmd_export_triton(args: argparse.Namespace) -> int:
    from pickscore.exporter.triton import export_triton

    out = export_triton(args.model, args.out, precision=args.precision, max_batch_size=args.max_batch_size,
                        max_images_per_request=args.max_images_per_request, max_queue_delay_us=args.max_queue_delay_us,
                        tensorrt=args.tensorrt, instances=args.instances)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``, refused as a usage error otherwise."""
    def integer(text: str) -> int:  # argparse names the type by __name__: "invalid integer value"
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return integer


def _held_out_fraction(text: str) -> float:
    """An argparse type: a float in (0, 0.5], refused as a usage error otherwise."""
    value = float(text)
    if not 0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5], got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (PickScoreError, OSError, ValueError) as e:  # bad model, input, data or settings: say which, exit 1
        print(f"pickscore: error: {e}", file=sys.stderr)
        return 1


def _expand(paths: Sequence[str]) -> list[Path]:
    """Files as given; directories expanded recursively (sorted) to files with image extensions."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            out.append(p)
    return out


def _score_files(args: argparse.Namespace) -> tuple[list[Path], np.ndarray, dict[int, PickScoreError]]:
    from pickscore.scorer import Scorer

    files = _expand(args.images)
    if not files:
        raise InvalidInput(f"no image files found in {' '.join(args.images)}")
    if args.server:
        scores, errors = _score_on_server(args, files)
    else:
        scorer = Scorer.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                        batch_size=args.batch_size, max_pixels=args.max_pixels)
        scores, errors = scorer.score_all(args.prompt, files, skip_invalid=args.skip_invalid, progress=True)
    if len(errors) == len(files):
        raise InvalidInput(f"none of the {len(files)} images could be scored; first: {errors[0]}")
    return files, scores, errors


def _score_on_server(args: argparse.Namespace, files: list[Path]) -> tuple[np.ndarray, dict[int, PickScoreError]]:
    from pickscore.client import Client

    with Client(args.server, timeout=args.timeout) as client:
        args.model = client.model_info().source  # the JSON names the model, as a local run does
        if args.skip_invalid:
            scores, errors = client.score_many(args.prompt, files, skip_invalid=True)
        else:
            scores, errors = np.asarray(client.score(args.prompt, files), np.float32), {}
    return scores, errors


def _cmd_serve(args: argparse.Namespace) -> int:
    from pickscore.server.app import serve
    from pickscore.server.settings import Settings

    return serve(Settings.from_namespace(args))


def _cmd_score(args: argparse.Namespace) -> int:
    files, scores, errors = _score_files(args)
    results = [{"image": str(f), "score": float(s)} for i, (f, s) in enumerate(zip(files, scores)) if i not in errors]
    _emit(args, results, errors, files, columns=("score",))
    return 0


def _cmd_rank(args: argparse.Namespace) -> int:
    from pickscore.scorer import rank_scores

    files, scores, errors = _score_files(args)
    valid = [i for i in range(len(files)) if i not in errors]
    ranking = rank_scores(scores[valid], args.top_k)  # softmax over the valid candidates only
    results = [
        {"image": str(files[valid[j]]), "score": ranking.scores[j], "probability": ranking.probabilities[j], "rank": r + 1}
        for r, j in enumerate(ranking.order)
    ]
    _emit(args, results, errors, files, columns=("rank", "score", "probability"))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pickscore.model.checkpoint import resolve, save

    out = save(resolve(args.model), args.out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_data_synthetic(args: argparse.Namespace) -> int:
    from pickscore.training.synthetic import write_synthetic

    written = write_synthetic(args.out, pairs=args.pairs, seed=args.seed, image_size=args.image_size,
                              row_group_size=args.row_group_size, held_out=args.held_out, progress=True)
    print(f"wrote {len(written)} splits to {args.out}", file=sys.stderr)
    return 0


def _emit(args: argparse.Namespace, results: list[dict[str, Any]], errors: dict[int, PickScoreError],
          files: list[Path], columns: tuple[str, ...]) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
