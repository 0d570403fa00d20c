"""A two-model reward: two servers called one after the other against one server's Rewards request.

    python benchmarks/rewards_bench.py              # two reduced ViT-B-32-like models, 512 px JPEGs (~1.5 min, 2 cores)
    python benchmarks/rewards_bench.py --smoke      # tiny towers, small images, a few requests: seconds

Two models of different shapes with random weights (Hugging Face CLIP layout, the same CLIP-H preprocessing), each
best-of-8 request of --image-side px JPEGs with one prompt, the reward being 1.0 x model a + 0.5 x model b:
  A  what users do today: two `pickscore serve` processes, one model each; the client scores each request on
     server a, then on server b (as an RL trainer calling one reward function after another) and sums the
     weighted scores itself
  B  one `pickscore serve --model a=DIR_A --model b=DIR_B` process; the client sends one scoring.v1 Rewards
     request (models a:1.0, b:0.5)
All three servers run at once, with default flags (--compute-threads, decode workers). At each concurrency
(closed loop), --rounds rounds each run side A then side B on the same images and prompts (a fresh prompt per
request and round, so no text cache helps; the image cache is off by default). Reported per side and
concurrency: images/s (median over rounds), p50/p99 per request (over every request of the rounds), the ratio
B/A, the servers' CPU ms per image (utime + stime of the server processes over the window) and images decoded
per image scored (pickscore_images_decoded_total). Every B reward is checked against A's sum for the same prompt
and images: the run fails when the largest difference exceeds --tolerance. Writes JSON and markdown under --out
and a section of benchmarks/RESULTS.md.

Sizes: the models are ViT-B-32's layout at reduced widths and depths (a: vision 384 wide x 6 layers, text 256 x 6;
b: vision 512 x 8, text 384 x 6; patch 32 at 224 px), together about 40% of one ViT-B-32 forward pass, so the
towers still dominate an image's cost while the whole run stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PER_REQUEST,
    append_results,
    closed_loop,
    cpu_seconds,
    descendants,
    git_revision,
    jpegs,
    latency_stats,
    machine_with_flags,
    serve,
    write_clip,
    write_outputs,
)

WEIGHTS = {"a": 1.0, "b": 0.5}


def _tower(width: int, layers: int, heads: int) -> dict:
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)


def _clip(vision: tuple[int, int, int], text: tuple[int, int, int], projection: int, patch: int = 32) -> dict:
    """A CLIPConfig's fields from (width, layers, heads) of each tower; MLP 4x wide, as in CLIP."""
    return dict(
        projection_dim=projection,
        text_config=_tower(*text),
        vision_config=dict(**_tower(*vision), patch_size=patch, image_size=224),
    )


# model name -> CLIPConfig fields, for the measurement and for --smoke
SIZES = {
    "bench": {"a": _clip((384, 6, 6), (256, 6, 4), 256), "b": _clip((512, 8, 8), (384, 6, 6), 384)},
    "smoke": {"a": _clip((32, 2, 4), (32, 2, 4), 16), "b": _clip((48, 3, 4), (32, 2, 4), 24)},
}


def decoded(metrics_port: int) -> float:
    """The server's pickscore_images_decoded_total."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("pickscore_images_decoded_total"):
                return float(line.split()[-1])
    return 0.0


class Side:
    """One side's servers, its call (``await side.call(prompt, blobs)``, which records the rewards by prompt) and
    its measurements."""

    def __init__(self, name: str, servers: list, call, images: list[bytes]):
        self.name, self.servers, self.call, self.images = name, servers, call, images  # servers: (proc, entry)
        self.runs: dict[int, list[dict]] = {}
        self.latencies: dict[int, list[float]] = {}

    def counters(self) -> tuple[float, float]:
        """(CPU seconds of every server process tree, images decoded by the servers) so far."""
        pids = [p for proc, _ in self.servers for p in descendants(proc.pid)]
        return sum(cpu_seconds(pids).values()), sum(decoded(e["metrics_port"]) for _, e in self.servers)

    async def run(self, concurrency: int, requests: int, tag: str, bar) -> None:
        async def call(prompt, blobs):
            await self.call(f"{tag} {prompt}", blobs)
            bar.update(1)

        cpu0, dec0 = await asyncio.to_thread(self.counters)
        lat = self.latencies.setdefault(concurrency, [])
        stats = await closed_loop(call, self.images, concurrency, requests, lat)
        cpu1, dec1 = await asyncio.to_thread(self.counters)
        images = requests * PER_REQUEST
        stats.update(cpu_ms_per_image=(cpu1 - cpu0) * 1000 / images, decodes_per_image=(dec1 - dec0) / images)
        self.runs.setdefault(concurrency, []).append(stats)

    def summary(self) -> dict[int, dict]:
        out = {}
        for c, runs in self.runs.items():
            pooled = latency_stats(self.latencies[c], len(self.latencies[c]) * PER_REQUEST, 1.0)
            out[c] = {
                "images_per_s": statistics.median(r["images_per_s"] for r in runs),
                "p50_ms": pooled["p50_ms"],
                "p99_ms": pooled["p99_ms"],
                "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in runs),
                "decodes_per_image": statistics.median(r["decodes_per_image"] for r in runs),
                "requests": len(self.latencies[c]),
                "rounds": runs,
            }
        return out


async def measure(sides_servers: dict, images: list[bytes], levels: list[int], requests: int, rounds: int) -> dict:
    """Both sides at every level, alternating A and B in each round; then the check of B's rewards against A's."""
    from tqdm import tqdm

    from pickscore.client import AsyncClient
    from pickscore.v1 import scoring_pb2 as pb

    (sa, sb), (single,) = sides_servers["A"], sides_servers["B"]
    sums: dict[str, list[float]] = {}
    rewards: dict[str, list[float]] = {}
    async with (
        AsyncClient(f"127.0.0.1:{sa[1]['port']}", timeout=600) as ca,
        AsyncClient(f"127.0.0.1:{sb[1]['port']}", timeout=600) as cb,
        AsyncClient(f"127.0.0.1:{single[1]['port']}", timeout=600) as cab,
    ):

        async def side_a(prompt, blobs):
            a = await ca.score(prompt, blobs)  # one reward function ...
            b = await cb.score(prompt, blobs)  # ... then the next
            sums[prompt] = [WEIGHTS["a"] * x + WEIGHTS["b"] * y for x, y in zip(a, b)]

        models = [pb.ModelWeight(model=m, weight=w) for m, w in WEIGHTS.items()]

        async def side_b(prompt, blobs):
            request = pb.RewardsRequest(prompt=prompt, images=[pb.Image(data=b) for b in blobs], models=models)
            rewards[prompt] = list((await cab.stub.Rewards(request, timeout=600)).rewards)

        sides = [Side("A", [sa, sb], side_a, images), Side("B", [single], side_b, images)]
        plan = [(c, r, side) for c in levels for r in range(rounds) for side in sides]
        total = sum(max(requests, 2 * c) for c, _, _ in plan) + 2 * 4
        with tqdm(total=total, unit="req", desc="warm-up") as bar:
            for side in sides:
                await closed_loop(lambda p, b, s=side: s.call("warm-up " + p, b), images, 2, 4)
                bar.update(4)
            for c, r, side in plan:
                bar.set_description(f"concurrency {c}, round {r + 1}, side {side.name}")
                await side.run(c, max(requests, 2 * c), f"c{c} r{r}", bar)
    diff = max(abs(x - y) for k, v in rewards.items() if k in sums for x, y in zip(v, sums[k]))
    compared = sum(len(v) for k, v in rewards.items() if k in sums)
    return {"sides": {s.name: s.summary() for s in sides}, "check": {"max_abs_diff": diff, "rewards": compared}}


def start_servers(sizes: dict, tmp: Path) -> dict:
    """The models written under ``tmp`` and the three servers: side A's two (one model each), side B's one."""
    dirs = {name: write_clip(cfg, tmp / name, seed) for seed, (name, cfg) in enumerate(sizes.items())}
    started: dict[str, list] = {"A": [], "B": []}
    try:
        for name in WEIGHTS:
            started["A"].append(serve(dirs[name]))
        started["B"].append(serve(f"a={dirs['a']}", "--model", f"b={dirs['b']}"))
    except BaseException:
        stop(started)
        raise
    return started


def stop(started: dict) -> None:
    for proc, _ in (s for servers in started.values() for s in servers):
        proc.terminate()
        proc.wait(60)


def markdown(results: dict) -> str:
    lines = [
        "| concurrency | side | images/s | B/A | p50 ms | p99 ms | server CPU ms/image | decodes/image |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    sides = results["sides"]
    for c in sides["A"]:
        for name, label in (("A", "A: two servers, one after the other"), ("B", "B: one server, one Rewards")):
            r = sides[name][c]
            ratio = f"{r['images_per_s'] / sides['A'][c]['images_per_s']:.2f}x" if name == "B" else ""
            lines.append(
                f"| {c} | {label} | {r['images_per_s']:.1f} | {ratio} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                f"{r['cpu_ms_per_image']:.1f} | {r['decodes_per_image']:.2f} |"
            )
    check = results["check"]
    lines.append(
        f"\nB's rewards against A's client-side sums: max abs difference {check['max_abs_diff']:.2e} over "
        f"{check['rewards']} rewards."
    )
    return "\n".join(lines) + "\n"


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--smoke", action="store_true", help="tiny towers, 64 px images, 2 requests a level: seconds")
    p.add_argument("--image-side", type=int, default=None, help="JPEG side in pixels (default 512; 64 with --smoke)")
    p.add_argument("--concurrency", default=None, help="closed-loop concurrency levels (default 1,8; 1,2 with --smoke)")
    p.add_argument(
        "--requests", type=int, default=None, help="best-of-8 requests per level, round and side (default 16; 2)"
    )
    p.add_argument("--rounds", type=int, default=None, help="alternating A, B rounds per level (default 2; 1)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest |B reward - A sum| accepted (default 1e-3)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for JSON and markdown")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    defaults = dict(image_side=64, concurrency="1,2", requests=2, rounds=1) if args.smoke else {}
    defaults = {**dict(image_side=512, concurrency="1,8", requests=16, rounds=2), **defaults}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    size = "smoke" if args.smoke else "bench"
    images = jpegs(16, args.image_side)
    with tempfile.TemporaryDirectory() as tmp:
        started = start_servers(SIZES[size], Path(tmp))
        try:
            measured = asyncio.run(measure(started, images, levels, args.requests, args.rounds))
        finally:
            stop(started)
    results = {"machine": machine_with_flags(), "commit": git_revision(), "sizes": SIZES[size], "weights": WEIGHTS}
    results.update(image_side=args.image_side, **measured)
    table = write_outputs(args.out, f"rewards-{size}-{args.image_side}px", results, markdown)
    if results["check"]["max_abs_diff"] > args.tolerance:
        print(f"B's rewards differ from A's sums by more than {args.tolerance}: not appended", file=sys.stderr)
        return 1
    if not args.no_append:
        command = "python benchmarks/rewards_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
        append_results(
            f"Two-model reward: two servers in turn vs one Rewards request ({size}, best-of-8, {args.image_side} px)",
            table,
            {"machine": results["machine"], "command": command.strip()},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
