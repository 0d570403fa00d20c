"""Overload benchmark: open-loop best-of-8 requests at 0.5x, 1x, 2x and 3x of measured saturation.

    python benchmarks/overload_bench.py                    # ViT-B-32 shape, CPU, 512 px JPEGs, 10 s deadlines
    python benchmarks/overload_bench.py --policies defaults --levels 1,3 --duration 20

For each admission policy, in one run against `pickscore serve` in its own process:
  count     admission by queue size alone (--max-queue-wait-s 0): what the server did before admission by time
  defaults  the server's own defaults, no admission flag: --max-queue-wait-s auto, a bound that follows the
            measured batch time (and each request's deadline)
  time      a fixed bound in seconds (this script's --max-queue-wait-s, default 2.5 s, the one tuned by hand
            before auto), and each request's deadline
it measures saturation (closed loop, concurrency 8, a refused caller waiting for its retry hint), the unloaded
p50 (concurrency 1), then Poisson arrivals at each multiple of saturation for --duration seconds, every request
with the same deadline. Reported per level: goodput (requests answered OK per second, and as a share of
saturation), admitted p50/p99 (requests answered OK), p99 over the unloaded p50, refusals (RESOURCE_EXHAUSTED) and
their p50/p99 latency, deadline failures, and the share of the image tower's compute spent on requests that then
failed (from the server's own /metrics). Writes JSON, a markdown table, a plot, and a section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PER_REQUEST, append_results, jpegs, machine_with_flags, serve, write_model, write_outputs  # noqa: E402

# each policy's server flags; "time" takes the benchmark's --max-queue-wait-s
POLICIES = {"count": ("--max-queue-wait-s", "0"), "defaults": ()}


def start_server(model_dir: Path, args, extra: tuple[str, ...]) -> tuple[subprocess.Popen, str, int]:
    flags = ("--device", args.device, "--max-batch-size", str(args.max_batch_size), *extra)
    proc, entry = serve(model_dir, *flags)
    return proc, f"127.0.0.1:{entry['port']}", entry["metrics_port"]


def computed_images(metrics_port: int) -> float:
    """Images the image towers have run forward passes on (the batch-size histograms' sum, over models)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        sums = [
            float(line.split()[-1])
            for line in r.read().decode().splitlines()
            if line.startswith("pickscore_batch_size_sum{") and 'tower="image"' in line
        ]
    if not sums:
        raise RuntimeError("no pickscore_batch_size_sum for the image tower")
    return sum(sums)


async def measure(address: str, metrics_port: int, images: list[bytes], args) -> dict:
    from pickscore.client import AsyncClient
    from pickscore.errors import DeadlineExceeded, Overloaded

    async with AsyncClient(address, timeout=args.deadline) as client:
        await client.model_info()
        counter = iter(range(10**9))

        async def call() -> tuple[str, float, float]:
            """(outcome, seconds, the retry hint of a refusal, else 0)"""
            i = next(counter)
            blobs = [images[(i * PER_REQUEST + k) % len(images)] for k in range(PER_REQUEST)]
            start, hint = time.perf_counter(), 0.0
            try:
                await client.score(f"prompt number {i}", blobs)
                outcome = "ok"
            except Overloaded as e:
                outcome, hint = "refused", e.retry_after_s or 0.05
            except DeadlineExceeded:
                outcome = "deadline"
            except Exception:  # noqa: BLE001 - counted, not hidden
                outcome = "error"
            return outcome, time.perf_counter() - start, hint

        async def closed(concurrency: int, n: int) -> list[tuple[str, float]]:
            """``n`` answered requests from ``concurrency`` callers, each refused caller waiting for its hint (as a
            well-behaved client does: refusals spun at once would take the cores saturation is measured on)."""
            out = []

            async def caller():
                while sum(o != "refused" for o, _, _ in out) < n:
                    out.append(await call())
                    await asyncio.sleep(out[-1][2])

            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return out

        await closed(2, 4)  # warm-up
        start = time.perf_counter()
        sat_runs = await closed(8, args.saturation_requests)
        saturation = sum(o == "ok" for o, _, _ in sat_runs) / (time.perf_counter() - start)  # requests/s
        unloaded = float(np.median([t for _, t, _ in await closed(1, 5)]) * 1000)
        print(f"  saturation {saturation:.3f} requests/s, unloaded p50 {unloaded:.0f} ms", flush=True)

        levels = {}
        rng = random.Random(0)
        for level in args.levels:
            rate = level * saturation
            before = computed_images(metrics_port)
            tasks, start = [], time.perf_counter()
            at = start
            while at - start < args.duration:
                at += rng.expovariate(rate)
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                tasks.append(asyncio.create_task(call()))
            results = await asyncio.gather(*tasks)
            wall = time.perf_counter() - start
            await asyncio.sleep(0.5)
            computed = computed_images(metrics_port) - before
            ok = [t * 1000 for o, t, _ in results if o == "ok"]
            refused = [t * 1000 for o, t, _ in results if o == "refused"]

            def pct(xs, q):
                return float(np.percentile(xs, q)) if xs else float("nan")

            row = {
                "offered_requests_per_s": rate,
                "requests": len(results),
                "ok": len(ok),
                "refused": len(refused),
                "deadline": sum(o == "deadline" for o, _, _ in results),
                "error": sum(o == "error" for o, _, _ in results),
                "goodput_requests_per_s": len(ok) / wall,
                "goodput_over_saturation": len(ok) / wall / saturation,
                "admitted_p50_ms": pct(ok, 50),
                "admitted_p99_ms": pct(ok, 99),
                "admitted_p99_over_unloaded_p50": pct(ok, 99) / unloaded,
                "refusal_p50_ms": pct(refused, 50),
                "refusal_p99_ms": pct(refused, 99),
                "wasted_compute_share": max(0.0, 1 - len(ok) * PER_REQUEST / computed) if computed else 0.0,
            }
            levels[level] = row
            print(
                f"  {level:g}x: {row['requests']} sent, ok {row['ok']}, refused {row['refused']}, deadline "
                f"{row['deadline']}, goodput {row['goodput_over_saturation']:.2f} of saturation, admitted p99 "
                f"{row['admitted_p99_ms']:.0f} ms, refusal p99 {row['refusal_p99_ms']:.1f} ms, wasted "
                f"{row['wasted_compute_share']:.2f}",
                flush=True,
            )
            await asyncio.sleep(args.deadline)  # let anything still queued finish before the next level
        return {"saturation_requests_per_s": saturation, "unloaded_p50_ms": unloaded, "levels": levels}


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for policy, r in results["policies"].items():
        levels = sorted(r["levels"], key=float)
        x = [float(level) for level in levels]
        left.plot(x, [r["levels"][lv]["goodput_over_saturation"] for lv in levels], "o-", label=policy)
        right.plot(x, [r["levels"][lv]["admitted_p99_over_unloaded_p50"] for lv in levels], "o-", label=policy)
    left.axhline(0.9, color="grey", ls=":", label="target 0.9")
    right.axhline(5, color="grey", ls=":", label="target 5x")
    left.set(xlabel="offered load (x saturation)", ylabel="goodput / saturation", title="Goodput", ylim=(0, 1.2))
    right.set(xlabel="offered load (x saturation)", ylabel="admitted p99 / unloaded p50", title="Admitted p99")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"Overload, {results['shape']}, {results['deadline_s']:g} s deadlines — {results['machine']}", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def markdown(results: dict) -> str:
    lines = [
        "| policy | load | sent | ok | refused | deadline | goodput / sat. | admitted p50 / p99 ms "
        "| p99 / unloaded p50 | refusal p50 / p99 ms | compute wasted |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, r in results["policies"].items():
        for level, row in r["levels"].items():
            lines.append(
                f"| {policy} | {float(level):g}x | {row['requests']} | {row['ok']} | {row['refused']} | "
                f"{row['deadline']} | {row['goodput_over_saturation']:.2f} | {row['admitted_p50_ms']:.0f} / "
                f"{row['admitted_p99_ms']:.0f} | {row['admitted_p99_over_unloaded_p50']:.1f} | "
                f"{row['refusal_p50_ms']:.1f} / {row['refusal_p99_ms']:.1f} | {row['wasted_compute_share']:.2f} |"
            )
    sat = ", ".join(
        f"{p}: {r['saturation_requests_per_s']:.2f} requests/s, unloaded p50 {r['unloaded_p50_ms']:.0f} ms"
        for p, r in results["policies"].items()
    )
    return "\n".join(lines) + f"\n\nSaturation (closed loop, concurrency 8) — {sat}.\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--shape", default="vit-b-32", choices=["tiny", "vit-b-32", "vit-h-14"], help="model shape")
    p.add_argument("--model", default=None, help="benchmark this model directory instead of a random-weight shape")
    p.add_argument("--device", default="cpu", help="torch device of the server (default cpu)")
    p.add_argument("--image-side", type=int, default=512, help="JPEG side in pixels (default 512)")
    p.add_argument("--levels", default="0.5,1,2,3", help="offered load as multiples of saturation (default 0.5,1,2,3)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per level (default 30)")
    p.add_argument("--deadline", type=float, default=10.0, help="deadline of every request in seconds (default 10)")
    p.add_argument("--saturation-requests", type=int, default=32, help="requests measuring saturation (default 32)")
    p.add_argument("--max-batch-size", type=int, default=32, help="server max_batch_size (default 32)")
    p.add_argument(
        "--max-queue-wait-s",
        type=float,
        default=2.5,
        help="the server's --max-queue-wait-s under the time policy (default 2.5, tuned by hand before auto)",
    )
    p.add_argument(
        "--policies",
        default="count,defaults",
        help="admission policies to compare, of count, defaults and time (default count,defaults)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for JSON, markdown, PNG")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    args.levels = [float(x) for x in args.levels.split(",")]
    args.policies = args.policies.split(",")
    for policy in args.policies:
        if policy not in (*POLICIES, "time"):
            p.error(f"--policies: unknown policy {policy!r}; count, defaults or time")
    images = jpegs(16, args.image_side)
    results = {
        "machine": machine_with_flags(),
        "shape": args.model or args.shape,
        "deadline_s": args.deadline,
        "duration_s": args.duration,
        "policies": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else write_model(args.shape, Path(tmp) / args.shape)
        for policy in args.policies:
            flags = POLICIES.get(policy, ("--max-queue-wait-s", str(args.max_queue_wait_s)))
            print(f"{policy}: {' '.join(flags) or 'the server defaults'}", flush=True)
            proc, address, metrics_port = start_server(model_dir, args, flags)
            try:
                results["policies"][policy] = asyncio.run(measure(address, metrics_port, images, args))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    stem = f"overload-{results['shape'].replace('/', '_')}-{args.device}-{'-'.join(args.policies)}"
    table = write_outputs(args.out, stem, results, markdown, plot)
    if not args.no_append:
        append_results(
            f"Overload ({results['shape']}, {args.device}, {args.deadline:g} s deadlines)",
            table + f"\n![overload]({args.out.name}/{stem}.png)\n",
            {
                "machine": results["machine"],
                "command": "python benchmarks/"
                + Path(__file__).name
                + " "
                + " ".join(sys.argv[1:] if argv is None else argv),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
