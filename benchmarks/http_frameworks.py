"""Which asyncio HTTP framework carries the front door: aiohttp against Starlette on uvicorn, measured.

    pip install starlette uvicorn        # only for this comparison; the server uses aiohttp
    python benchmarks/http_frameworks.py

Each framework serves, in its own process on loopback, the work the front door's framework does per request:
read a best-of-8 /v1/score body (eight 512 px JPEGs, base64 in JSON: about 0.4 MB), parse it, answer a small
JSON document; and a bare GET (a health probe). A client process (aiohttp) keeps 16 requests in flight.
Reported: requests/s and p50/p99 latency of each, and their ratio, from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import jpegs, machine  # noqa: E402

SERVERS = {
    "aiohttp": """
import json, sys
from aiohttp import web
async def score(request):
    body = json.loads(await request.read())
    return web.json_response({"results": [{"index": i, "score": 0.0} for i in range(len(body["images"]))]})
async def ready(request):
    return web.Response(status=200)
app = web.Application(client_max_size=64 << 20)
app.add_routes([web.post("/v1/score", score), web.get("/v2/health/ready", ready)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
""",
    "starlette+uvicorn": """
import json, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
async def score(request):
    body = json.loads(await request.body())
    return JSONResponse({"results": [{"index": i, "score": 0.0} for i in range(len(body["images"]))]})
async def ready(request):
    return Response(status_code=200)
app = Starlette(routes=[Route("/v1/score", score, methods=["POST"]), Route("/v2/health/ready", ready)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
""",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(port: int, body: bytes | None, requests: int, concurrency: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    todo = iter(range(requests))
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}" + ("/v1/score" if body else "/v2/health/ready")

        async def one() -> None:
            if body:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
            else:
                async with session.get(url) as r:
                    await r.read()

        async def caller() -> None:
            for _ in todo:
                start = time.perf_counter()
                await one()
                latencies.append(time.perf_counter() - start)

        for _ in range(20):
            await one()  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"requests_per_s": requests / wall, "p50_ms": float(np.median(lat)), "p99_ms": float(np.percentile(lat, 99))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=600, help="requests per measurement (default 600)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    args = p.parse_args(argv)
    body = json.dumps(
        {"prompt": "a cat", "images": [{"data": base64.b64encode(b).decode()} for b in jpegs(8, 512)]}
    ).encode()
    results = {}
    for name, code in SERVERS.items():
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", code, str(port)])
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            results[name] = {
                "score_body": asyncio.run(load(port, body, args.requests, args.concurrency)),
                "health_get": asyncio.run(load(port, None, args.requests * 4, args.concurrency)),
            }
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{machine()}; body {len(body)} bytes, {args.concurrency} in flight")
    for name, r in results.items():
        for kind, m in r.items():
            print(
                f"{name:18s} {kind:10s} {m['requests_per_s']:8.0f} requests/s  p50 {m['p50_ms']:6.2f} ms  "
                f"p99 {m['p99_ms']:6.2f} ms"
            )
    a, s = results["aiohttp"], results["starlette+uvicorn"]
    for kind in ("score_body", "health_get"):
        print(f"aiohttp / starlette+uvicorn, {kind}: {a[kind]['requests_per_s'] / s[kind]['requests_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
