"""Exporter benchmark: torch eager vs ONNX Runtime fp32 vs int8 (and optionally fp16) on one model.

    python benchmarks/onnx_bench.py                       # ViT-B-32 shape, random weights, CPU
    python benchmarks/onnx_bench.py --model demo          # the bundled demo model (trained: agreement means more)

For each precision the model is exported with `pickscore export onnx` (fp32 verified against torch at
batch 1 and 7 with the ViT-B-32 tolerance, 1e-3), then every backend encodes the same preprocessed images:
images/s of the image tower at batch 1 and 8 (median over repetitions, warm-up excluded), text tower
prompts/s at batch 8, largest |embedding difference| from torch, and pairwise rank agreement with torch fp32
on best-of-8 sets of drawn scenes (one prompt each). Writes JSON and markdown and appends to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, machine, write_model  # noqa: E402

from pickscore.backends.manifest import load_manifest  # noqa: E402
from pickscore.backends.onnx_backend import OnnxBackend  # noqa: E402
from pickscore.backends.torch_backend import TorchBackend  # noqa: E402
from pickscore.exporter.onnx import export_onnx  # noqa: E402
from pickscore.exporter.verify import rank_agreement, verification_inputs  # noqa: E402
from pickscore.model.checkpoint import resolve  # noqa: E402


def per_second(fn, items: int, reps: int) -> float:
    """Median items/s of ``fn`` over ``reps`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return items / statistics.median(times)


def measure(name: str, backend, reference, pixels: np.ndarray, tokens: np.ndarray, reps: int, size_mb: float) -> dict:
    print(f"measuring {name}", file=sys.stderr)
    eight, one = pixels[:8], pixels[:1]
    return {
        "setup": name,
        "image_per_s_b1": per_second(lambda: backend.encode_image(one), 1, reps),
        "image_per_s_b8": per_second(lambda: backend.encode_image(eight), 8, reps),
        "text_per_s_b8": per_second(lambda: backend.encode_text(tokens[:8]), 8, reps),
        "max_abs_diff": max(
            float(np.abs(backend.encode_image(pixels[:16]) - reference.encode_image(pixels[:16])).max()),
            float(np.abs(backend.encode_text(tokens[:16]) - reference.encode_text(tokens[:16])).max()),
        ),
        "rank_agreement": rank_agreement(backend, reference, pixels, tokens),
        "size_mb": size_mb,
    }


def markdown(rows: list[dict]) -> str:
    base = rows[0]["image_per_s_b8"]
    lines = [
        "| setup | images/s, batch 1 | images/s, batch 8 | × torch (batch 8) | prompts/s, batch 8 | "
        "max abs diff vs torch | rank agreement vs torch fp32 | weights MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['setup']} | {r['image_per_s_b1']:.1f} | {r['image_per_s_b8']:.1f} | {r['image_per_s_b8'] / base:.2f} | "
        f"{r['text_per_s_b8']:.1f} | {r['max_abs_diff']:.1e} | {r['rank_agreement']:.4f} | {r['size_mb']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="vit-b-32", choices=["vit-b-32", "vit-h-14"], help="model shape, random weights")
    p.add_argument(
        "--model", default=None, help="benchmark this model reference (directory or 'demo') instead of a shape"
    )
    p.add_argument(
        "--precisions", default="fp32,int8", help="ONNX precisions to export and measure (default fp32,int8)"
    )
    p.add_argument("--sets", type=int, default=64, help="best-of-8 sets for rank agreement (default 64)")
    p.add_argument("--reps", type=int, default=10, help="timed calls per measurement, median taken (default 10)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="fp32 export tolerance against torch (default 1e-3)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for JSON and markdown")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    label = args.model or args.shape

    with tempfile.TemporaryDirectory() as tmp:
        ref = args.model or str(write_model(args.shape, Path(tmp) / args.shape))
        loaded = resolve(ref)
        reference = TorchBackend(loaded, device="cpu", dtype=torch.float32)
        pixels, tokens = verification_inputs(loaded.preprocess, loaded.tokenizer(), 8 * args.sets, seed=1)
        torch_mb = sum(t.numel() * 4 for t in loaded.model.state_dict().values()) / 2**20
        rows = [measure("torch eager fp32", reference, reference, pixels, tokens, args.reps, torch_mb)]
        for precision in args.precisions.split(","):
            out = Path(tmp) / f"onnx-{precision}"
            print(f"exporting {precision}", file=sys.stderr)
            export_onnx(ref, out, precision=precision, tolerance=args.tolerance, min_agreement=0.0)
            size_mb = sum(f.stat().st_size for f in out.glob("*.onnx")) / 2**20
            backend = OnnxBackend(out, manifest=load_manifest(out))
            rows.append(measure(f"ONNX Runtime {precision}", backend, reference, pixels, tokens, args.reps, size_mb))

    results = {"model": label, "machine": machine(), "sets": args.sets, "rows": rows}
    stem = args.out / f"onnx-{label.replace('/', '_')}-cpu"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    table = markdown(rows)
    stem.with_suffix(".md").write_text(table + "\n")
    print(table)
    if not args.no_append:
        append_results(
            f"Exporter, {label}, CPU: torch eager vs ONNX Runtime",
            table,
            {
                "machine": results["machine"],
                "command": "python " + " ".join(["benchmarks/onnx_bench.py", *(argv or sys.argv[1:])]),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
