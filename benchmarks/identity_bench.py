"""What a model's identity costs at load: the SHA-256 of its weights (``Backend.weights_digest``), computed once.

    flock /tmp/bench.lock python benchmarks/identity_bench.py [--shape vit-h-14] [--runs 3] [--no-append]

The demo model is loaded as `pickscore serve --model demo` loads it (``load_backend``) and its digest timed apart
from the load; then a state dict of ``--shape`` (random weights; ViT-H-14 is PickScore_v1's 986 M parameters) is
hashed in fp32 and bf16, as the torch backend hashes it, with the process's peak resident memory before and after
(the hash reads each tensor where it lies: no second copy of the weights). Seconds per GB are of the bytes hashed.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch
from common import SHAPES, append_results, machine_with_flags

from pickscore.backends import load_backend
from pickscore.backends.digest import sha256_of
from pickscore.backends.torch_backend import state_chunks
from pickscore.model import architecture, hf_convert


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed_digest(state: dict[str, torch.Tensor], runs: int) -> tuple[float, float]:
    """(median seconds to hash ``state``, its GB)."""
    size = sum(t.nbytes for t in state.values()) / 1e9
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sha256_of(state_chunks(state))
        times.append(time.perf_counter() - start)
    return statistics.median(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="vit-h-14", choices=sorted(SHAPES), help="the large state dict's shape")
    parser.add_argument("--runs", type=int, default=3, help="timed digests per state dict (the median is reported)")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    rows = ["| weights | GB hashed | load s | digest s (median) | s per GB | peak RSS GB before → after |"]
    rows.append("|---|---:|---:|---:|---:|---|")
    start = time.perf_counter()
    demo = load_backend("demo", "torch", "cpu", "fp32")
    load = time.perf_counter() - start
    seconds, size = timed_digest(demo.model.state_dict(), args.runs)
    rows.append(
        f"| demo model, fp32 (load includes one digest) | {size:.3f} | {load:.2f} | {seconds:.4f} | "
        f"{seconds / size:.2f} | — |"
    )
    print(rows[-1], flush=True)
    torch.manual_seed(0)
    model = architecture.build(hf_convert.model_config(SHAPES[args.shape]), "cpu").eval()
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        state = model.state_dict()
        before = peak_rss_gb()
        seconds, size = timed_digest(state, args.runs)
        rows.append(
            f"| {args.shape}, {str(dtype).removeprefix('torch.')} | {size:.2f} | — | {seconds:.2f} | "
            f"{seconds / size:.2f} | {before:.2f} → {peak_rss_gb():.2f} |"
        )
        print(rows[-1], flush=True)
        del state
    if not args.no_append:
        meta = {
            "machine": machine_with_flags(),
            "command": "python benchmarks/identity_bench.py " + " ".join(sys.argv[1:]),
        }
        append_results("Model identity: the weights' digest at load", "\n".join(rows), meta)


if __name__ == "__main__":
    main()
