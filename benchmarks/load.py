"""Closed-loop best-of-8 load, importing no torch: the request pattern of every serving benchmark, and client
processes for loads one Python client cannot generate (a GPU server's).

    python benchmarks/load.py      # a client process of ``drive``: its job as a JSON line on stdin (internal)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PER_REQUEST = 8  # best-of-8: the images of one request in every serving benchmark


def latency_stats(latencies_s: list[float], images: int, wall_s: float) -> dict[str, float]:
    lat = np.asarray(latencies_s) * 1000
    return {
        "images_per_s": images / wall_s,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests": len(lat),
    }


def prompts(n: int) -> list[str]:
    """``n`` distinct prompts (so no cache helps)."""
    return [f"prompt {i}: a watercolor painting of a fox in a snowy forest, detailed" for i in range(n)]


def score_sender(clients):
    """``send(prompt, refs)`` as one Score call a request, the calls taking ``clients`` (each a connection of its
    own) in turn."""
    turn = itertools.cycle(clients)

    async def send(prompt: str, refs: list) -> None:
        await next(turn).score(prompt, refs)

    return send


def reward_sender(rewards):
    """``send(prompt, refs)`` through a RewardClient, as an RL trainer sends a best-of-N: the request's pairs as one
    group of submissions, which the client carries with other groups' in requests of up to 32 pairs."""

    async def send(prompt: str, refs: list) -> None:
        await asyncio.gather(*(asyncio.wrap_future(rewards.submit(prompt, ref)) for ref in refs))

    return send


async def closed_loop(
    call, images: list, concurrency: int, requests: int, latencies: list[float] | None = None
) -> dict:
    """``concurrency`` callers, each sending its next best-of-8 request (``await call(prompt, blobs)``) as soon
    as the last one answered; images/s over the window, latency percentiles over requests (each latency, in
    seconds, is also appended to ``latencies`` when given). A refused request (a server admitting by time: the
    default) is sent again after the server's retry hint, its latency counting the wait, as a client would."""
    from pickscore.errors import Overloaded

    todo = iter(range(requests))
    latencies = [] if latencies is None else latencies
    names = prompts(requests)

    async def caller():
        for i in todo:
            blobs = [images[(i * PER_REQUEST + k) % len(images)] for k in range(PER_REQUEST)]
            t = time.perf_counter()
            while True:
                try:
                    await call(names[i], blobs)
                    break
                except Overloaded as e:
                    await asyncio.sleep(e.retry_after_s or 0.05)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latency_stats(latencies, requests * PER_REQUEST, time.perf_counter() - start)


def drive(
    address: str,
    images: list,
    concurrency: int,
    processes: int,
    requests_per_caller: int,
    during=None,
    own_connections: bool = False,
    rpc: str = "unary",
) -> dict:
    """Closed-loop load on the scoring.v1 server at ``address`` from ``processes`` client processes, together
    ``concurrency`` callers each sending ``requests_per_caller`` best-of-8 requests of ``images`` (JPEG bytes or
    uint8 pixel arrays): images/s from the first process's start to the last one's end, latency percentiles
    over all requests. ``during()`` runs here once every process has started its load; a dict it returns joins
    the result. ``own_connections``: each caller on a connection of its own (a server with front ends is
    spread over by connection), not one per process. ``rpc``: "unary", one Score call a request; "reward", each
    process's callers through one RewardClient (``reward_sender``)."""
    import tempfile

    per = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    with tempfile.NamedTemporaryFile(suffix=".pickle") as f:
        pickle.dump(images, f)
        f.flush()
        procs = []
        for callers in filter(None, per):
            job = {
                "address": address,
                "images": f.name,
                "callers": callers,
                "requests": callers * requests_per_caller,
                "connections": callers if own_connections else 1,
                "rpc": rpc,
            }
            proc = subprocess.Popen(
                [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            procs.append(proc)
        for proc in procs:  # each warmed up
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a client process failed before its load (exit {proc.wait()})")
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        side = during() if during else None
        results = [json.loads(proc.communicate()[0]) for proc in procs]
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    latencies = [x for r in results for x in r["latencies"]]
    stats = {
        "concurrency": concurrency,
        **latency_stats(latencies, len(latencies) * PER_REQUEST, end - start),
        "seconds": end - start,
    }
    return {**stats, **(side or {})}


def _client_process() -> None:
    from pickscore.client import AsyncClient, RewardClient

    job = json.loads(sys.stdin.readline())
    images = pickle.loads(Path(job["images"]).read_bytes())

    async def run() -> dict:
        async with AsyncClient(job["address"], timeout=600) as client:
            others = [AsyncClient(job["address"], timeout=600) for _ in range(job["connections"] - 1)]
            rewards = RewardClient(job["address"], timeout=600) if job["rpc"] == "reward" else None
            call = reward_sender(rewards) if rewards else score_sender([client, *others])

            await closed_loop(call, images, 1, 1)  # connected and warm
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
            latencies: list[float] = []
            start = time.time()
            await closed_loop(call, images, job["callers"], job["requests"], latencies)
            for other in others:
                await other.close()
            if rewards:
                await asyncio.get_running_loop().run_in_executor(None, rewards.close)
            return {"start": start, "end": time.time(), "latencies": latencies}

    print(json.dumps(asyncio.run(run())), flush=True)


if __name__ == "__main__":
    _client_process()
