"""Soak: one `pickscore serve` for --minutes under mixed traffic; its memory, file descriptors and threads over time.

    python benchmarks/soak_bench.py                 # 10 minutes, tiny towers, 256 px JPEGs, decode worker processes
    python benchmarks/soak_bench.py --minutes 30    # longer
    python benchmarks/soak_bench.py --smoke         # about 20 s, 64 px images: every kind of traffic, the same report

The server runs in its own process (--decode-processes by default, so its decode workers are child processes) with
small limits, so that the invalid kinds below cost little and its caches fill within the warm-up: --max-pixels
512², --max-message-bytes 1 MiB, --max-images-per-request 16, text and image caches of 1 MiB each; and admission
by a fixed 30 s bound (--max-queue-wait-s), so that no valid request of this bounded load should be refused. Clients
in this process send, all at once until the time is up (the valid kinds back to back with --concurrency callers each,
the others one caller each with --pause between calls):
  valid      Score, Rank, Rewards (pickscore.client.AsyncClient); /v1/score in JSON, /v1/rank in msgpack (HTTP);
             KServe v2 infer over gRPC and HTTP (tritonclient's aio clients); ScoreStream streams read to the end,
             and streams closed after their first answer
  invalid    corrupt images and empty prompts (both transports), an image over --max-pixels, a gRPC message and an
             HTTP body over --max-message-bytes, too many images, unknown model names (a new one each call, both
             transports)
  abandoned  Score calls the client cancels mid-flight, calls with a 2 ms deadline, HTTP clients that disconnect
             with half a body sent or before the answer
Each kind's outcomes (gRPC code, HTTP status, or what the client did) are checked against the ones it should get;
anything else (an INTERNAL, a 500, a refusal of a valid request, a connection error) is unexpected.

Every --sample-s seconds it records the server's RSS (VmRSS), threads and open file descriptors (/proc/PID), the
same summed over its child processes (decode workers, multiprocessing's resource tracker), the requests counted by
the clients and by the server's /metrics (pickscore_requests_total by transport, rpc and code), and the cache
bytes. Growth is the least-squares slope over the second half of the run (the first half is warm-up: caches and
allocator pools filling), flagged when the rise it fits over that half exceeds both 3x the residual noise and a
floor (5 MB of RSS, 4 fds, 2 threads). After the traffic stops the server must have nothing in flight or queued,
and it must exit 0 on SIGTERM. Writes JSON, markdown and a plot under --out and a section of benchmarks/RESULTS.md;
exits 1 on an unexpected outcome, a crash, a server that did not drain or exit cleanly, or (except --smoke, too
short to judge) flagged growth.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    append_results,
    descendants,
    git_revision,
    jpegs,
    machine_with_flags,
    serve,
    write_model,
    write_outputs,
)

MAX_PIXELS, MAX_MESSAGE, MAX_IMAGES, CACHE_BYTES = 512 * 512, 1 << 20, 16, 1 << 20
# The load is closed-loop and bounded (a few hundred items at most in flight), never an overload: with a fixed
# bound this far above any wait it causes, a refused valid request means admission kept reservations it should not.
MAX_WAIT_S = 30
DEADLINE_S = 0.002  # the over-deadline calls' deadline
# kind -> (group, outcomes it should get); gRPC outcomes are status code names, HTTP ones status numbers
KINDS: dict[str, tuple[str, set[str]]] = {
    "score/grpc": ("valid", {"ok"}),
    "rank/grpc": ("valid", {"ok"}),
    "rewards/grpc": ("valid", {"ok"}),
    "score_json/http": ("valid", {"200"}),
    "rank_msgpack/http": ("valid", {"200"}),
    "kserve_infer/grpc": ("valid", {"ok"}),
    "kserve_infer/http": ("valid", {"ok"}),
    "stream/grpc": ("valid", {"ok"}),
    "stream_closed_early/grpc": ("valid", {"closed"}),
    "corrupt_image/grpc": ("invalid", {"INVALID_ARGUMENT"}),
    "corrupt_image/http": ("invalid", {"400"}),
    "empty_prompt/grpc": ("invalid", {"INVALID_ARGUMENT"}),
    "empty_prompt/http": ("invalid", {"400"}),
    "oversized_image/grpc": ("invalid", {"INVALID_ARGUMENT"}),
    "oversized_message/grpc": ("invalid", {"RESOURCE_EXHAUSTED"}),
    "oversized_body/http": ("invalid", {"413"}),  # TooLarge naming --max-message-bytes
    "too_many_images/http": ("invalid", {"400"}),
    "unknown_model/grpc": ("invalid", {"NOT_FOUND"}),
    "unknown_model/http": ("invalid", {"404"}),
    # a cancel can come after the answer; a 2 ms deadline is met in the queue, or refused by admission at once
    "cancelled/grpc": ("abandoned", {"cancelled", "ok"}),
    "over_deadline/grpc": ("abandoned", {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}),
    "disconnect/http": ("abandoned", {"disconnected"}),
}
SERIES = {  # sampled series -> floor under which a fitted rise over the second half is not growth
    "rss_mb": 5.0,
    "children_rss_mb": 5.0,
    "fds": 4.0,
    "children_fds": 4.0,
    "threads": 2.0,
}


def outcome_of(error: BaseException) -> str:
    """A failed call's outcome: its gRPC code's name (domain errors mapped as the server maps them), or the type."""
    import grpc
    from tritonclient.utils import InferenceServerException

    from pickscore.errors import PickScoreError
    from pickscore.status import status_of

    if isinstance(error, PickScoreError):
        return status_of(error)[0].name
    if isinstance(error, grpc.RpcError):
        return error.code().name
    if isinstance(error, InferenceServerException):
        return f"kserve {error.status()}: {error.message()[:80]}"
    return f"error {type(error).__name__}: {str(error)[:80]}"


class Traffic:
    """Every kind's call (``await traffic.call(kind, i)`` -> its outcome) over one set of clients."""

    def __init__(self, entry: dict, images: list[bytes], big: bytes, per_request: int):
        self.entry, self.images, self.big, self.per_request = entry, images, big, per_request
        self.address = f"127.0.0.1:{entry['port']}"
        self.http = f"http://127.0.0.1:{entry['http_port']}"
        self.corrupt = [images[0][: len(images[0]) // 3], b"this is a text file, not an image\n"]
        self.rng = random.Random(0)

    async def __aenter__(self) -> Traffic:
        import aiohttp
        import tritonclient.grpc.aio as triton_grpc
        import tritonclient.http.aio as triton_http

        from pickscore.client import AsyncClient

        self.client = AsyncClient(self.address, timeout=60)
        await self.client.model_info()  # cached: the 2 ms calls spend their deadline on the call alone
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self.kserve_grpc = triton_grpc.InferenceServerClient(self.address)
        self.kserve_http = triton_http.InferenceServerClient(f"127.0.0.1:{self.entry['http_port']}")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()
        await self.session.close()
        await self.kserve_grpc.close()
        await self.kserve_http.close()

    def blobs(self, i: int) -> list[bytes]:
        return [self.images[(i * self.per_request + k) % len(self.images)] for k in range(self.per_request)]

    async def call(self, kind: str, i: int) -> str:
        prompt = f"soak {kind} {i}: a watercolor painting of a fox in a snowy forest"  # a new one: the cache turns
        try:
            return await getattr(self, kind.replace("/", "_"))(prompt, i)
        except Exception as e:  # noqa: BLE001 - every failure is an outcome, counted and checked
            return outcome_of(e)

    def score_request(self, prompt: str, images: list[bytes], model: str = ""):
        from pickscore.v1 import scoring_pb2 as pb

        return pb.ScoreRequest(prompt=prompt, images=[pb.Image(data=b) for b in images], model=model)

    async def unary(self, prompt: str, images: list[bytes], model: str = "") -> str:
        await self.client.stub.Score(self.score_request(prompt, images, model), timeout=60)
        return "ok"

    async def post(self, path: str, fields: dict, binary: bool = True) -> str:
        import msgpack

        if binary:
            body, kind = msgpack.packb(fields), "application/msgpack"
        else:
            images = [{"data": base64.b64encode(im["data"]).decode()} for im in fields["images"]]
            body, kind = json.dumps({**fields, "images": images}).encode(), "application/json"
        async with self.session.post(self.http + path, data=body, headers={"Content-Type": kind}) as r:
            await r.read()
            return str(r.status)

    @staticmethod
    def fields(prompt: str, images: list[bytes]) -> dict:
        return {"prompt": prompt, "images": [{"data": b} for b in images]}

    # valid
    async def score_grpc(self, prompt: str, i: int) -> str:
        await self.client.score(prompt, self.blobs(i))
        return "ok"

    async def rank_grpc(self, prompt: str, i: int) -> str:
        await self.client.rank(prompt, self.blobs(i), top_k=2)
        return "ok"

    async def rewards_grpc(self, prompt: str, i: int) -> str:
        await self.client.rewards(prompt, self.blobs(i))
        return "ok"

    async def score_json_http(self, prompt: str, i: int) -> str:
        return await self.post("/v1/score", self.fields(prompt, self.blobs(i)), binary=False)

    async def rank_msgpack_http(self, prompt: str, i: int) -> str:
        return await self.post("/v1/rank", {**self.fields(prompt, self.blobs(i)), "top_k": 2})

    def kserve_inputs(self, module, prompt: str, images: list[bytes]) -> list:
        text = module.InferInput("PROMPT", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=object))
        image = module.InferInput("IMAGE", [len(images), 1], "BYTES")
        image.set_data_from_numpy(np.array([[b] for b in images], dtype=object))
        return [text, image]

    async def kserve_infer_grpc(self, prompt: str, i: int) -> str:
        import tritonclient.grpc.aio as module

        await self.kserve_grpc.infer("pickscore", self.kserve_inputs(module, prompt, self.blobs(i)))
        return "ok"

    async def kserve_infer_http(self, prompt: str, i: int) -> str:
        import tritonclient.http.aio as module

        await self.kserve_http.infer("pickscore", self.kserve_inputs(module, prompt, self.blobs(i)))
        return "ok"

    def stream_call(self, prompt: str, i: int):
        from pickscore.v1 import scoring_pb2 as pb

        messages = [
            pb.ScoreStreamRequest(tag=str(k), request=self.score_request(f"{prompt} part {k}", self.blobs(i + k)))
            for k in range(3)
        ]
        return self.client.stub.ScoreStream(iter(messages), timeout=60)

    async def stream_grpc(self, prompt: str, i: int) -> str:
        answers = [r async for r in self.stream_call(prompt, i)]
        errors = [r.error.code for r in answers if r.error.code]
        return f"in-band error {errors[0]}" if errors else "ok" if len(answers) == 3 else f"{len(answers)} answers"

    async def stream_closed_early_grpc(self, prompt: str, i: int) -> str:
        call = self.stream_call(prompt, i)
        async for _ in call:
            break
        call.cancel()
        return "closed"

    # invalid
    async def corrupt_image_grpc(self, prompt: str, i: int) -> str:
        return await self.unary(prompt, [self.images[0], self.corrupt[i % 2]])

    async def corrupt_image_http(self, prompt: str, i: int) -> str:
        return await self.post("/v1/score", self.fields(prompt, [self.images[0], self.corrupt[i % 2]]))

    async def empty_prompt_grpc(self, prompt: str, i: int) -> str:
        return await self.unary("", self.blobs(i))

    async def empty_prompt_http(self, prompt: str, i: int) -> str:
        return await self.post("/v1/score", self.fields("", self.blobs(i)), binary=False)

    async def oversized_image_grpc(self, prompt: str, i: int) -> str:
        return await self.unary(prompt, [self.images[0], self.big])

    async def oversized_message_grpc(self, prompt: str, i: int) -> str:
        return await self.unary(prompt, [bytes(MAX_MESSAGE + 1024)])

    async def oversized_body_http(self, prompt: str, i: int) -> str:
        return await self.post("/v1/score", self.fields(prompt, [bytes(MAX_MESSAGE + 1024)]))

    async def too_many_images_http(self, prompt: str, i: int) -> str:
        return await self.post("/v1/score", self.fields(prompt, [self.images[0]] * (MAX_IMAGES + 1)))

    async def unknown_model_grpc(self, prompt: str, i: int) -> str:
        return await self.unary(prompt, self.blobs(i), model=f"no-such-model-{i}")  # a new name: nothing may keep it

    async def unknown_model_http(self, prompt: str, i: int) -> str:
        return await self.post(f"/v1/models/no-such-model-{i}/score", self.fields(prompt, self.blobs(i)))

    # abandoned
    async def cancelled_grpc(self, prompt: str, i: int) -> str:
        call = self.client.stub.Score(self.score_request(prompt, self.blobs(i)), timeout=60)
        await asyncio.sleep(self.rng.uniform(0.0005, 0.03))
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            return "cancelled"
        return "ok"  # answered before the cancel

    async def over_deadline_grpc(self, prompt: str, i: int) -> str:
        await self.client.score(prompt, self.blobs(i), timeout=DEADLINE_S)
        return "ok"

    async def disconnect_http(self, prompt: str, i: int) -> str:
        """Half a body then gone (odd i), or the whole request and gone before the answer (even i)."""
        import msgpack

        body = msgpack.packb(self.fields(prompt, self.blobs(i)))
        head = (
            f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/msgpack\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        _, writer = await asyncio.open_connection("127.0.0.1", self.entry["http_port"])
        writer.write(head + (body[: len(body) // 2] if i % 2 else body))
        await writer.drain()
        await asyncio.sleep(self.rng.uniform(0.001, 0.02))
        writer.close()
        await writer.wait_closed()
        return "disconnected"


def process_stats(pids: list[int]) -> dict[str, float]:
    """RSS (MB), threads and open fds summed over ``pids`` (those still there)."""
    rss = threads = fds = 0
    for pid in pids:
        try:
            status = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
            )
            fds += len(list(Path(f"/proc/{pid}/fd").iterdir()))
        except OSError:
            continue
        rss += int(status["VmRSS"].split()[0]) / 1024
        threads += int(status["Threads"])
    return {"rss_mb": rss, "threads": threads, "fds": fds}


def scrape(text: str) -> dict:
    """From /metrics: requests by "transport rpc code", cache bytes by "model cache", in flight, queued items."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {"requests": {}, "cache_bytes": {}, "inflight": 0.0, "queued": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pickscore_requests_total":
                out["requests"][f"{s.labels['transport']} {s.labels['rpc']} {s.labels['code']}"] = s.value
            elif s.name == "pickscore_cache_bytes":
                out["cache_bytes"][f"{s.labels['model']} {s.labels['cache']}"] = s.value
            elif s.name == "pickscore_inflight_requests":
                out["inflight"] = s.value
            elif s.name == "pickscore_queue_depth":
                out["queued"] += s.value
    return out


class Soak:
    """The run: traffic loops, the sampler, and what they counted."""

    def __init__(self, args):
        self.args = args
        self.proc, self.entry = None, {}  # the server, once started: its process and "serving" log entry
        self.counts: dict[str, Counter] = {kind: Counter() for kind in KINDS}
        self.samples: list[dict] = []
        self.log_levels: Counter = Counter()
        self.log_problems: list[str] = []  # the first server log lines at WARNING or above
        self.crashed: int | None = None

    def on_line(self, line: str) -> None:
        entry = json.loads(line) if line.startswith("{") else {"level": "TEXT", "message": line.strip()}
        level = str(entry.get("level", "?")).upper()
        self.log_levels[level] += 1
        if level not in ("INFO", "DEBUG") and len(self.log_problems) < 20:
            self.log_problems.append(line.strip()[:400])

    async def metrics(self, session) -> dict:
        async with session.get(f"http://127.0.0.1:{self.entry['metrics_port']}/metrics") as r:
            return scrape(await r.text())

    async def sample(self, session, start: float) -> None:
        pids = descendants(self.proc.pid)
        main, children = await asyncio.to_thread(lambda: (process_stats(pids[:1]), process_stats(pids[1:])))
        server = await self.metrics(session)
        self.samples.append(
            {
                "t_s": round(time.monotonic() - start, 2),
                **main,
                "children": len(pids) - 1,
                **{f"children_{k}": v for k, v in children.items()},
                "client": {kind: sum(c.values()) for kind, c in self.counts.items()},
                "server_requests": sum(server["requests"].values()),
                "cache_bytes": sum(server["cache_bytes"].values()),
            }
        )

    async def loop(self, traffic: Traffic, kind: str, caller: int, stop_at: float, pause: float) -> None:
        i = caller * 10**7
        while time.monotonic() < stop_at and self.crashed is None:
            self.counts[kind][await traffic.call(kind, i)] += 1
            i += 1
            await asyncio.sleep(pause)

    async def run(self, images: list[bytes], big: bytes) -> dict:
        import aiohttp

        args = self.args
        async with Traffic(self.entry, images, big, args.per_request) as traffic, aiohttp.ClientSession() as session:
            start = time.monotonic()
            stop_at = start + args.minutes * 60
            loops = [
                self.loop(traffic, kind, c, stop_at, 0.0 if group == "valid" else args.pause)
                for kind, (group, _) in KINDS.items()
                for c in range(args.concurrency if group == "valid" else 1)
            ]
            tasks = [asyncio.create_task(x) for x in loops]
            while time.monotonic() < stop_at:
                if self.proc.poll() is not None:  # before the scrape, which a dead server would refuse
                    self.crashed = self.proc.returncode
                    break
                await self.sample(session, start)
                await asyncio.sleep(min(args.sample_s, max(0.0, stop_at - time.monotonic())))
            await asyncio.gather(*tasks)
            await asyncio.sleep(2.0)  # what was abandoned leaves the queues
            if self.crashed is None:
                await self.sample(session, start)
                return await self.metrics(session)
        return {}


def growth(samples: list[dict], duration_s: float) -> dict[str, dict]:
    """Per series: the least-squares slope per hour over the second half, the rise it fits over that half, the
    residual noise, and whether the rise is growth (over 3x the noise and the series' floor)."""
    half = [s for s in samples if s["t_s"] >= duration_s / 2]
    out = {}
    for key, floor in SERIES.items():
        if len(half) < 3:
            out[key] = {"per_hour": float("nan"), "rise": float("nan"), "noise": float("nan"), "growing": False}
            continue
        t = np.array([s["t_s"] for s in half]) / 3600
        y = np.array([s[key] for s in half], dtype=float)
        slope, intercept = np.polyfit(t, y, 1)
        noise = float(np.std(y - (slope * t + intercept)))
        rise = float(slope * (t[-1] - t[0]))
        out[key] = {"per_hour": float(slope), "rise": rise, "noise": noise, "growing": rise > max(floor, 3 * noise)}
    return out


def report(soak: Soak, final: dict, exit_code: int | None, duration_s: float) -> dict:
    samples = soak.samples
    unexpected = {
        kind: {o: n for o, n in c.items() if o not in KINDS[kind][1]}
        for kind, c in soak.counts.items()
        if any(o not in KINDS[kind][1] for o in c)
    }
    server_errors = {k: v for k, v in final.get("requests", {}).items() if k.split()[-1] in ("INTERNAL", "UNKNOWN")}
    warm = min(samples, key=lambda s: abs(s["t_s"] - duration_s / 2))
    return {
        "kinds": {kind: {"group": KINDS[kind][0], "outcomes": dict(c)} for kind, c in soak.counts.items()},
        "unexpected": unexpected,
        "server": final,
        "server_errors": server_errors,
        "server_log_levels": dict(soak.log_levels),
        "server_log_problems": soak.log_problems,
        "crashed": soak.crashed,
        "drained": bool(final) and final["inflight"] == 0 and final["queued"] == 0,
        "exit_code": exit_code,
        "points": {"start": samples[0], "after_warm_up": warm, "end": samples[-1]},
        "growth": growth(samples, duration_s),
        "samples": samples,
    }


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    t = np.array([s["t_s"] for s in samples]) / 60
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [
        (axes[0, 0], "RSS (MB)", [("server", "rss_mb"), ("children (decode workers)", "children_rss_mb")]),
        (axes[0, 1], "open file descriptors", [("server", "fds"), ("children", "children_fds")]),
        (axes[1, 0], "threads", [("server", "threads"), ("children", "children_threads")]),
    ]
    for ax, title, series in panels:
        for label, key in series:
            ax.plot(t, [s[key] for s in samples], ".-", ms=3, label=label)
        ax.set(title=title)
    rate = axes[1, 1]
    totals = np.array([sum(s["client"].values()) for s in samples], dtype=float)
    rate.plot(t[1:], np.diff(totals) / np.maximum(np.diff(t * 60), 1e-9), ".-", ms=3, label="client calls")
    served = np.array([s["server_requests"] for s in samples], dtype=float)
    rate.plot(t[1:], np.diff(served) / np.maximum(np.diff(t * 60), 1e-9), ".-", ms=3, label="server /metrics")
    rate.set(title="requests/s (every outcome)")
    for ax in axes.flat:
        ax.axvline(results["minutes"] / 2, color="grey", ls=":", label="warm-up ends")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set(xlabel="minutes")
    fig.suptitle(f"Soak, {results['model']}, {results['minutes']:g} min — {results['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def markdown(results: dict) -> str:
    lines = ["| kind | group | calls | outcomes |", "|---|---|---:|---|"]
    for kind, k in results["kinds"].items():
        outcomes = ", ".join(f"{o} {n}" for o, n in sorted(k["outcomes"].items(), key=lambda x: -x[1]))
        lines.append(f"| {kind} | {k['group']} | {sum(k['outcomes'].values())} | {outcomes} |")
    total = sum(sum(k["outcomes"].values()) for k in results["kinds"].values())
    lines += [f"\n{total} calls in {results['minutes']:g} min; unexpected outcomes: {results['unexpected'] or 'none'}."]
    codes = Counter()
    for key, n in results["server"].get("requests", {}).items():
        codes[key.split()[-1]] += int(n)
    lines.append(
        f"Server's /metrics, requests by code: {dict(codes.most_common())}; INTERNAL/UNKNOWN: "
        f"{results['server_errors'] or 'none'}."
    )
    lines += [
        "",
        "| | server RSS MB | children RSS MB (n) | server fds | children fds | server threads |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in results["points"].items():
        lines.append(
            f"| {name.replace('_', ' ')} ({s['t_s'] / 60:.1f} min) | {s['rss_mb']:.1f} | {s['children_rss_mb']:.1f} "
            f"({s['children']}) | {s['fds']} | {s['children_fds']} | {s['threads']} |"
        )
    g = results["growth"]
    lines += [
        "",
        "| second half | slope per hour | fitted rise | residual noise | growth |",
        "|---|---:|---:|---:|---|",
    ]
    for key, r in g.items():
        lines.append(
            f"| {key} | {r['per_hour']:+.2f} | {r['rise']:+.2f} | {r['noise']:.2f} | "
            f"{'**yes**' if r['growing'] else 'no'} |"
        )
    lines.append(
        f"\nServer crashed: {'no' if results['crashed'] is None else results['crashed']}; drained after the traffic: "
        f"{'yes' if results['drained'] else 'no'}; exit code on SIGTERM: {results['exit_code']}; server log lines by "
        f"level: {results['server_log_levels']}."
    )
    return "\n".join(lines) + "\n"


def verdict(results: dict, smoke: bool) -> list[str]:
    """What fails the run (empty: nothing)."""
    problems = [f"unexpected outcomes: {results['unexpected']}"] if results["unexpected"] else []
    problems += [f"server errors: {results['server_errors']}"] if results["server_errors"] else []
    problems += [f"server crashed with {results['crashed']}"] if results["crashed"] is not None else []
    problems += [] if results["drained"] else ["the server still had requests in flight or queued"]
    problems += [] if results["exit_code"] == 0 else [f"the server exited {results['exit_code']} on SIGTERM"]
    growing = [k for k, r in results["growth"].items() if r["growing"]]
    problems += [f"growth in {', '.join(growing)}"] if growing and not smoke else []
    return problems


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--smoke", action="store_true", help="about 20 s, 64 px images, 4 images a request, 1 s samples")
    p.add_argument("--minutes", type=float, default=None, help="minutes of traffic (default 10; 1/3 with --smoke)")
    p.add_argument("--model", default=None, help="serve this --model (a directory, demo) instead of tiny random towers")
    p.add_argument("--image-side", type=int, default=None, help="JPEG side in pixels (default 256; 64 with --smoke)")
    p.add_argument("--per-request", type=int, default=None, help="images per valid request (default 8; 4 with --smoke)")
    p.add_argument("--concurrency", type=int, default=2, help="callers of each valid kind (default 2)")
    p.add_argument("--pause", type=float, default=0.05, help="seconds between an invalid or abandoned kind's calls")
    p.add_argument("--sample-s", type=float, default=None, help="seconds between samples (default 5; 1 with --smoke)")
    p.add_argument(
        "--decode",
        default="processes",
        choices=["processes", "threads"],
        help="the server's decode pool (default processes: --decode-processes)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for JSON, markdown, PNG")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    defaults = dict(minutes=1 / 3, image_side=64, per_request=4, sample_s=1.0) if args.smoke else {}
    for key, value in {**dict(minutes=10.0, image_side=256, per_request=8, sample_s=5.0), **defaults}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def server_flags(args) -> list[str]:
    flags = ["--max-pixels", str(MAX_PIXELS), "--max-message-bytes", str(MAX_MESSAGE)]
    flags += ["--max-images-per-request", str(MAX_IMAGES), "--max-queue-wait-s", str(MAX_WAIT_S)]
    flags += ["--text-cache-bytes", str(CACHE_BYTES), "--image-cache-bytes", str(CACHE_BYTES)]
    return flags + (["--decode-processes"] if args.decode == "processes" else [])


def soak(model, args) -> tuple[Soak, dict, int | None]:
    """Serve ``model``, run the traffic, stop the server with SIGTERM -> the run, the last scrape, its exit code."""
    run = Soak(args)
    run.proc, run.entry = serve(model, *server_flags(args), on_line=run.on_line)
    proc = run.proc
    images = jpegs(16, args.image_side)
    big = jpegs(1, 1024, seed=1)[0]  # over --max-pixels: refused from its header
    try:
        final = asyncio.run(run.run(images, big))
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - a server that does not stop is killed and reported
            proc.kill()
            code = None
    return run, final, code


def main(argv=None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_model("tiny", Path(tmp) / "tiny")
        run, final, code = soak(model, args)
    label = "smoke" if args.smoke else f"{Path(str(args.model or 'tiny')).name}-{args.minutes:g}min"
    results = {
        "machine": machine_with_flags(),
        "commit": git_revision(),
        "model": str(args.model or "tiny random towers"),
        "minutes": args.minutes,
        "image_side": args.image_side,
        "per_request": args.per_request,
        "server_flags": server_flags(args),
        **report(run, final, code, args.minutes * 60),
    }
    stem = f"soak-{label}"
    table = write_outputs(args.out, stem, results, markdown, plot)
    problems = verdict(results, args.smoke)
    for problem in problems:
        print(f"soak: {problem}", file=sys.stderr)
    if not args.no_append:
        command = "python benchmarks/soak_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
        append_results(
            f"Soak ({results['model']}, {args.minutes:g} min, mixed traffic)",
            table + f"\n![soak]({args.out.name}/{stem}.png)\n",
            {"machine": results["machine"], "command": command.strip()},
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
