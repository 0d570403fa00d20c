"""`pickscore batch` throughput against the serving benchmark's workload, on one machine in one run.

    python benchmarks/batch_bench.py                      # ViT-B-32 shape, CPU, 512 px JPEGs, 256 rows

Measured, on the same JPEGs:
  (a) `pickscore batch --model` in-process (decoding on every core, the model in this process)
  (b) `pickscore batch --server` against `pickscore serve` in its own process
  (c) the serving benchmark's workload on that server: best-of-8 requests, closed loop at concurrency 8
Images/s of each (wall time of the batch command, model load excluded for (a) as its own figure), and the
ratios of (a) and (b) to (c). Appends a section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, closed_loop, jpegs, machine, serve, write_model  # noqa: E402


def batch(data: Path, out: Path, *where: str) -> float:
    """Images/s of one `pickscore batch` run (its own measure: scoring time, model load excluded)."""
    cmd = [sys.executable, "-m", "pickscore.cli", "batch", "--input", str(data), "--output", str(out), "--json"]
    done = subprocess.run([*cmd, *where], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["images_per_s_this_run"]


async def serving(address: str, images: list[bytes], requests: int) -> dict:
    from pickscore.client import AsyncClient

    async with AsyncClient(address, timeout=600) as client:
        await client.score("warm-up", images[:8])
        return await closed_loop(client.score, images, 8, requests)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--shape", default="vit-b-32", choices=["tiny", "vit-b-32", "vit-h-14"], help="model shape")
    p.add_argument("--rows", type=int, default=256, help="rows of the batch job (default 256)")
    p.add_argument("--image-side", type=int, default=512, help="JPEG side in pixels (default 512)")
    p.add_argument("--requests", type=int, default=32, help="best-of-8 requests of (c) (default 32)")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    images = jpegs(16, args.image_side)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_model(args.shape, tmp / args.shape)
        data = tmp / "rows.parquet"
        rows = [{"prompt": f"prompt number {i // 8}", "image": images[i % len(images)]} for i in range(args.rows)]
        pq.write_table(pa.Table.from_pylist(rows), data, row_group_size=64)
        local = batch(data, tmp / "a", "--model", str(model), "--device", "cpu")
        print(f"(a) in-process {local:.1f} images/s", flush=True)
        # closed loops measure saturation, as serve_bench's: admission by count alone (the default, auto, keeps
        # the queue near one batch and refuses the rest, which the job retries; tests/jobs covers that path)
        proc, entry = serve(model, "--device", "cpu", "--max-queue-wait-s", "0")
        try:
            remote = batch(data, tmp / "b", "--server", f"127.0.0.1:{entry['port']}")
            print(f"(b) on the server {remote:.1f} images/s", flush=True)
            reference = asyncio.run(serving(f"127.0.0.1:{entry['port']}", images, args.requests))
            print(f"(c) serving, best-of-8 at concurrency 8: {reference['images_per_s']:.1f} images/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    ref = reference["images_per_s"]
    table = (
        "| path | images/s | vs serving (c) |\n|---|---|---|\n"
        f"| (a) `pickscore batch --model` in-process | {local:.1f} | {local / ref:.2f}x |\n"
        f"| (b) `pickscore batch --server` (one local server) | {remote:.1f} | {remote / ref:.2f}x |\n"
        f"| (c) serving: best-of-8, concurrency 8 | {ref:.1f} | 1.00x |\n"
    )
    print(table)
    if not args.no_append:
        command = "python benchmarks/batch_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
        append_results(
            f"Batch jobs ({args.shape}, cpu, {args.rows} rows of {args.image_side} px JPEGs)",
            table,
            {"machine": machine(), "command": command.strip()},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
