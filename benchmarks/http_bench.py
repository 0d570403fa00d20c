"""One best-of-8 workload over three transports of the same server: gRPC, HTTP JSON, HTTP msgpack.

    python benchmarks/http_bench.py                      # tiny towers: the transports' own cost shows
    python benchmarks/http_bench.py --shape vit-b-32     # a real tower shape: the model's cost dominates

`pickscore serve` runs in its own process; each transport sends the same requests (8 JPEGs of --image-side
px, a fresh prompt each, so no cache helps): gRPC through pickscore.client.AsyncClient, HTTP JSON as
/v1/score with base64 images, HTTP msgpack as /v1/score with raw bytes (aiohttp client). Closed loop at each
concurrency; images/s over the window, p50/p99 over requests, the ratio of each to gRPC from the same run.
Writes JSON and markdown under --out and a section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, closed_loop, jpegs, machine, serve, write_model, write_outputs  # noqa: E402


async def measure(entry: dict, images: list[bytes], levels: list[int], requests: int) -> dict:
    import aiohttp
    import msgpack

    from pickscore.client import AsyncClient

    out: dict[str, dict] = {}
    http = f"http://127.0.0.1:{entry['http_port']}/v1/score"
    async with AsyncClient(f"127.0.0.1:{entry['port']}", timeout=600) as grpc_client, aiohttp.ClientSession() as s:

        async def over_grpc(prompt, blobs):
            await grpc_client.score(prompt, blobs)

        async def over_json(prompt, blobs):
            body = json.dumps({"prompt": prompt, "images": [{"data": base64.b64encode(b).decode()} for b in blobs]})
            async with s.post(http, data=body, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
                json.loads(await r.read())

        async def over_msgpack(prompt, blobs):
            body = msgpack.packb({"prompt": prompt, "images": [{"data": b} for b in blobs]})
            async with s.post(http, data=body, headers={"Content-Type": "application/msgpack"}) as r:
                assert r.status == 200, await r.read()
                msgpack.unpackb(await r.read())

        for name, call in (("grpc", over_grpc), ("http-json", over_json), ("http-msgpack", over_msgpack)):
            await closed_loop(call, images, 2, 4)  # warm-up
            out[name] = {c: await closed_loop(call, images, c, max(requests, 2 * c)) for c in levels}
            print(name, {c: round(r["images_per_s"], 1) for c, r in out[name].items()}, flush=True)
    return out


def markdown(results: dict) -> str:
    lines = ["| transport | concurrency | images/s | vs gRPC | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for name, levels in results["transports"].items():
        for c, r in levels.items():
            base = results["transports"]["grpc"][c]["images_per_s"]
            lines.append(
                f"| {name} | {c} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f}x | {r['p50_ms']:.0f} "
                f"| {r['p99_ms']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--shape", default="tiny", choices=["tiny", "vit-b-32", "vit-h-14"], help="model shape")
    p.add_argument("--device", default="cpu", help="torch device of the server (default cpu)")
    p.add_argument("--image-side", type=int, default=512, help="JPEG side in pixels (default 512)")
    p.add_argument("--concurrency", default="1,8", help="closed-loop concurrency levels (default 1,8)")
    p.add_argument("--requests", type=int, default=40, help="requests per level and transport (default 40)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for JSON and markdown")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    images = jpegs(16, args.image_side)
    with tempfile.TemporaryDirectory() as tmp:
        proc, entry = serve(write_model(args.shape, Path(tmp) / args.shape), "--device", args.device)
        try:
            transports = asyncio.run(measure(entry, images, levels, args.requests))
        finally:
            proc.terminate()
            proc.wait(60)
    results = {"machine": machine(), "shape": args.shape, "transports": transports}
    table = write_outputs(args.out, f"transports-{args.shape}-{args.device}", results, markdown)
    if not args.no_append:
        command = "python benchmarks/http_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
        append_results(
            f"Transports ({args.shape}, {args.device}, best-of-8, {args.image_side} px JPEGs)",
            table,
            {"machine": results["machine"], "command": command.strip()},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
