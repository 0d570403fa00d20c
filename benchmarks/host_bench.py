"""The host that feeds the GPU: the server's CPU time and interpreter-lock time per image, projected to 16 cores.

    python benchmarks/host_bench.py                            # every mode, 512 px JPEGs, best-of-8
    python benchmarks/host_bench.py --modes exact,processes --window-s 20 --no-append

`pickscore serve` runs the tiny-tower model (towers that cost almost nothing, `--compute-threads 1` as on a
GPU host) on loopback, and a closed loop of best-of-8 requests (a fresh prompt each, so no cache helps) keeps
it saturated. For each mode, over a steady window after a warm-up:

  CPU per image   the server's CPU seconds (utime + stime from /proc/PID/stat of the server and every process
                  below it, decode workers included, read before and after the window) over the images it
                  scored in the window (its own `pickscore_images_scored` counter). The client's CPU is not
                  counted. Clock ticks are 10 ms; a window holds thousands of them. The host part leaves out
                  device work: the towers' thread (with `--compute-threads 1` it alone runs the forward passes
                  and the normalisation, which a GPU runs; its own CPU from /proc/PID/task/TID/stat, the thread
                  named from py-spy's output) and, for `device`, the decoding below.
  GIL per image   py-spy (`record --gil --threads --nonblocking --format raw --rate R --duration D`, a second
                  window) reads, R times a second, which thread holds the interpreter lock and keeps that
                  thread's stack (py-spy's own "Samples" counts only the stacks kept, so the instants are R x D).
                  At most one thread of a process holds the lock, so the samples kept in a process over R x D
                  instants are the fraction of wall time its lock is held; over the images/s of that window,
                  seconds held per image. Without --nonblocking py-spy stops the process for every sample, which
                  here cost the server 15% of its images/s and counted the event loop as holding the lock about
                  twice its whole time on a core; read without stopping, a thread with a known duty (holding the
                  lock 40% of the time) reads within a few percent (tests/benchmarks/test_host_bench.py). A sample
                  whose stack changed while read is an error, counted as held by the main process. Stacks are 150
                  samples/s by default: faster, py-spy falls behind on these 2 cores. With `--subprocesses` each
                  decode worker is counted apart: the lock is per process, and what bounds one server is its main
                  process's. The towers' thread's lock time is kept (launching a forward pass is host work). On 2
                  shared cores a lock holder waiting for a core still counts as holding it, so this window gives
                  an upper bound (in brackets: each thread's samples times its on-a-core share of runnable time,
                  /proc/PID/task/TID/schedstat). A third window (--realtime) puts every thread of the server's
                  main process on the real-time scheduler (SCHED_RR) and py-spy above it: a runnable thread of it
                  then takes a core at once, as on a host with cores to spare, so its samples are the lock held
                  on a core; the ceiling uses that window. The server's threads run at nice -10 (--nice), its
                  decode workers 10 levels above their own (still below the event loop), to keep other loads off.
  projection      one server process on 16 cores (--cores) scores at most cores / CPU-s-per-image and at most
                  1 / GIL-s-per-image images/s; the ceiling is the smaller, against --target (2,400 images/s:
                  ViT-H-14 at an H200's roofline).

Modes: `exact` (JPEG bytes; Pillow decode, resize, crop in decode threads); `processes` (the same in decode worker
processes, `--decode-processes`), also with the requests sent otherwise than one Score call each:
`processes-stream` (as the messages of ScoreStreams) and `processes-reward` (by a RewardClient, which sends the
pairs of several requests in one: an RL trainer's client); `pixels` (the client sends decoded uint8 pixels, 512 x
512 x 3, as `Image.pixels`; the server resizes and crops), `pixels-processes` and `pixels-processes-reward`
(pixels as a RewardClient sends an RL pipeline's PIL images); `device` (`--decode-on-device`: here torchvision
decodes and resizes on the CPU, work an accelerator would do. The host part leaves out that share of the decode
threads' CPU: `crop_on_device`'s steps are timed apart in-process first, one thread, `time.thread_time` -- header,
buffer and copy back are host work; decode_jpeg, interpolate, round, cast and crop device work -- and the decode
threads' CPU in the server is split by that ratio; the lock time is all host work and kept whole). `--extra-flags
MODE=FLAGS` adds server flags to a mode.
Writes JSON and markdown under --out and, unless --no-append, a section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PER_REQUEST,
    append_results,
    closed_loop,
    cpu_seconds,
    descendants,
    git_revision,
    jpegs,
    machine_with_flags,
    prompts,
    py_spy,
    reward_sender,
    score_sender,
    serve,
    write_model,
)

# mode -> (server flags, what the client sends, how: one Score call a request, a ScoreStream's messages, or a
# RewardClient's batches of pairs)
MODES = {
    "exact": ((), "jpeg", "unary"),
    "device": (("--decode-on-device",), "jpeg", "unary"),
    "pixels": ((), "pixels", "unary"),
    "processes": (("--decode-processes",), "jpeg", "unary"),
    "processes-stream": (("--decode-processes",), "jpeg", "stream"),
    "processes-reward": (("--decode-processes",), "jpeg", "reward"),
    "pixels-processes": (("--decode-processes",), "pixels", "unary"),
    "pixels-processes-reward": (("--decode-processes",), "pixels", "reward"),
    "front-ends": (("--front-ends", "2", "--decode-processes"), "jpeg", "unary"),
}
TICK = os.sysconf("SC_CLK_TCK")


def images_scored(metrics_port: int) -> float:
    """The server's `pickscore_images_scored` counter, summed over its models (and front ends)."""
    return sum(images_by_front_end(metrics_port).values())


def images_by_front_end(metrics_port: int) -> dict[str, float]:
    """`pickscore_images_scored` by the ``front_end`` label (one key, "", for a server without front ends)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for labels, n in re.findall(r"^pickscore_images_scored_total(?:\{([^}]*)\})? (\S+)$", text, re.M):
        front_end = re.search(r'front_end="(\d+)"', labels or "")
        key = front_end.group(1) if front_end else ""
        out[key] = out.get(key, 0.0) + float(n)
    return out


def device_share(images: list[bytes], seconds: float = 3.0) -> float:
    """Of the CPU time ``crop_on_device`` spends on a JPEG here (one thread), the share of what ``--decode-on-device``
    hands the device (decode_jpeg, interpolate, round, clamp, cast, crop); the rest (the header, the buffer, the
    copy back) is host work on a GPU host too. Measured with ``time.thread_time`` around each part."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from pickscore.model.preprocess import PreprocessConfig, resize_size

    cfg, threads = PreprocessConfig(), torch.get_num_threads()
    torch.set_num_threads(1)  # as the server's decode threads run it (--compute-threads 1)
    try:
        n, host, device, start = 0, 0.0, 0.0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            data = images[n % len(images)]
            t0 = time.thread_time()
            width, height = resize_size(*Image.open(io.BytesIO(data), formats=("JPEG",)).size, cfg)
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            t1 = time.thread_time()
            pixels = decode_jpeg(encoded, ImageReadMode.RGB)
            resized = F.interpolate(
                pixels[None].float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
            )
            resized = resized.round_().clamp_(0, 255).to(torch.uint8)[0]
            top, left = (height - 224) // 2, (width - 224) // 2
            out = torch.zeros((3, 224, 224), dtype=torch.uint8)
            out[:] = resized[:, top : top + 224, left : left + 224]
            t2 = time.thread_time()
            out.permute(1, 2, 0).cpu().numpy()
            t3 = time.thread_time()
            host, device, n = host + (t1 - t0) + (t3 - t2), device + (t2 - t1), n + 1
        return device / (host + device)
    finally:
        torch.set_num_threads(threads)


def decode_alone_ms(images: list[bytes], seconds: float = 3.0) -> float:
    """CPU ms per image of one thread running the exact path alone (``load_uint8``: decode, resize, crop), here
    and now: what the server's figures compare with on the same cores in the same state."""
    from pickscore.model.preprocess import PreprocessConfig, load_uint8

    cfg, n, spent, start = PreprocessConfig(), 0, 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.thread_time()
        load_uint8(images[n % len(images)], cfg)
        spent, n = spent + time.thread_time() - t, n + 1
    return 1000 * spent / n


def parse_raw(path: Path) -> dict[tuple[str, int], int]:
    """py-spy raw output (``--threads``) -> GIL-held samples per (process, thread id). The process is "main"
    without ``--subprocesses``, else its ``process PID:"cmdline"`` frame."""
    counts: dict[tuple[str, int], int] = {}
    if not path.exists():
        return counts
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        thread = next((f for f in frames if f.startswith("thread (")), "thread (0)")
        key = (procs[-1] if procs else "main", int(thread[len("thread (") :].split(")", 1)[0]))
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def tasks(pid: int) -> list[int]:
    """The thread ids of process ``pid`` (none once it is gone)."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return []


def thread_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds of every thread of ``pids``, by thread id."""
    out: dict[int, float] = {}
    for p in pids:
        for tid in tasks(p):
            try:
                fields = Path(f"/proc/{p}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            out[tid] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def thread_names(path: Path) -> dict[int, str]:
    """Thread id -> Python thread name, from py-spy's ``thread (TID): NAME`` frames (threads that held the lock)."""
    names: dict[int, str] = {}
    if path.exists():
        for match in re.finditer(r"thread \((\d+)\): ([^;]+);", path.read_text()):
            names[int(match.group(1))] = match.group(2)
    return names


def schedstat(pids: list[int]) -> dict[int, tuple[int, int]]:
    """Per thread of ``pids``: (ns on a core, ns runnable but waiting for one), from /proc/PID/task/TID/schedstat."""
    out = {}
    for p in pids:
        for tid in tasks(p):
            try:
                run, wait, _ = Path(f"/proc/{p}/task/{tid}/schedstat").read_text().split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            out[tid] = (int(run), int(wait))
    return out


def renice(server: int, pids: list[int], nice: int) -> None:
    """Every thread of the ``server`` process at ``nice`` (its towers' thread too, as on a GPU host, where the
    threads launching forward passes are not lowered as a CPU's are), and the processes below it (decode workers)
    moved as much, keeping their place below the server's event loop. Linux keeps niceness per thread; new threads
    inherit their creator's."""
    for p in pids:
        for tid in tasks(p):
            try:
                level = nice if p == server else os.getpriority(os.PRIO_PROCESS, tid) + nice
                os.setpriority(os.PRIO_PROCESS, tid, max(-20, min(19, level)))
            except ProcessLookupError:
                continue


def busy_cores_s() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq, steal) since boot."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / TICK


@asynccontextmanager
async def load(rpc: str, address: str, payload: list, concurrency: int, connections: int = 1) -> AsyncIterator[None]:
    """A saturating closed loop of best-of-8 requests while the block runs, a fresh prompt each (no cache helps),
    ``concurrency`` of them in flight, sent as ``rpc`` says: "unary", one Score call a request; "stream", each a
    message of a ScoreStream (``concurrency`` / 8 streams of 8 in flight: the server's --stream-window); "reward",
    a RewardClient (each request's 8 pairs submitted as a group; the client sends them in requests of up to 32
    pairs, at most 4 in flight, as an RL trainer's would be). ``connections`` (unary): the callers spread over
    that many clients, each a connection of its own, as many callers' would be."""
    from pickscore.client import AsyncClient, RewardClient
    from pickscore.client.wire import image_messages
    from pickscore.server.settings import Settings
    from pickscore.v1 import scoring_pb2 as pb

    stop = asyncio.Event()
    async with AsyncClient(address, timeout=600) as client:
        if rpc == "stream":
            count, names = itertools.count(), prompts(1_000_000)

            async def stream(window: int) -> None:
                free = asyncio.Semaphore(window)

                async def messages():
                    while not stop.is_set():
                        await free.acquire()
                        i = next(count)
                        refs = [payload[(i * PER_REQUEST + k) % len(payload)] for k in range(PER_REQUEST)]
                        yield pb.ScoreStreamRequest(
                            tag=str(i), request=pb.ScoreRequest(prompt=names[i], images=image_messages(refs, None))
                        )

                async for answer in client.stub.ScoreStream(messages()):
                    assert answer.WhichOneof("result") == "response", answer
                    free.release()

            window = Settings().stream_window  # the server's (started with its default)
            callers = [stream(window) for _ in range(max(1, concurrency // window))]
        else:
            if rpc == "unary":
                clients = [client] + [AsyncClient(address, timeout=600) for _ in range(connections - 1)]
                send = score_sender(clients)

            else:
                rewards = RewardClient(address, timeout=600)
                send = reward_sender(rewards)

            async def call(prompt: str, refs: list) -> None:
                if not stop.is_set():  # once stopped, the loop's remaining requests pass at once
                    await send(prompt, refs)

            callers = [closed_loop(call, payload, concurrency, 100_000)]
        driver = asyncio.gather(*callers)
        try:
            yield
        finally:
            stop.set()
            await driver
            if rpc == "reward":
                await asyncio.get_running_loop().run_in_executor(None, rewards.close)
            if rpc == "unary":
                for other in clients[1:]:
                    await other.close()


async def measure_mode(mode: str, model_dir: Path, images, args) -> dict:
    server_flags, kind, rpc = MODES[mode]
    extra = tuple(args.extra.get(mode, "").split())
    proc, entry = serve(
        model_dir,
        *("--device", "cpu", "--compute-threads", "1", "--max-queue-wait-s", "0"),
        *("--max-batch-size", str(args.max_batch_size), *server_flags, *extra),
    )
    loop = asyncio.get_running_loop()
    try:
        payload = images if kind == "jpeg" else args.pixels
        # The kernel spreads a server's front ends by connection: each caller has its own, as independent ones would.
        connections = args.concurrency if "--front-ends" in server_flags else 1
        async with load(rpc, f"127.0.0.1:{entry['port']}", payload, args.concurrency, connections):
            await asyncio.sleep(args.warmup_s)

            def snapshot(first: bool):
                pids = descendants(proc.pid)
                if first and args.nice:
                    renice(proc.pid, pids, args.nice)
                me = cpu_seconds([os.getpid()])[os.getpid()]
                now = time.perf_counter(), images_scored(entry["metrics_port"]), cpu_seconds(pids), busy_cores_s()
                return (*now, me, thread_cpu(pids))

            t0, n0, c0, b0, m0, th0 = await loop.run_in_executor(None, snapshot, True)
            await asyncio.sleep(args.window_s)
            t1, n1, c1, b1, m1, th1 = await loop.run_in_executor(None, snapshot, False)
            cpu = {p: c1[p] - c0.get(p, 0.0) for p in c1}
            images_in_window, wall = n1 - n0, t1 - t0
            result = {
                "mode": mode,
                "server_flags": [*server_flags, *extra],
                "rpc": rpc,
                "processes": len(c1),
                "window_s": wall,
                "images": images_in_window,
                "images_per_s": images_in_window / wall,
                "server_cores": sum(cpu.values()) / wall,
                "client_cores": (m1 - m0) / wall,
                "other_cores": (b1 - b0 - sum(cpu.values()) - (m1 - m0)) / wall,
                "cpu_ms_per_image": 1000 * sum(cpu.values()) / images_in_window,
                "cpu_main_ms_per_image": 1000 * cpu.get(proc.pid, 0.0) / images_in_window,
            }
            thread_s = {t: v - th0.get(t, 0.0) for t, v in th1.items() if v - th0.get(t, 0.0) > 0}

            windows = {"": await lock_window(proc, entry, args, mode, result["processes"] > 1, 0)}
            if args.realtime:
                windows["rt_"] = await lock_window(proc, entry, args, mode, result["processes"] > 1, args.realtime)
        for prefix, w in windows.items():
            result.update({prefix + k: v for k, v in w.items()})
        # The forward passes run on the towers' thread (--compute-threads 1: nothing else computes them), on a CPU
        # here and on the accelerator on a GPU host: device work, like --decode-on-device's decoding below.
        names = thread_names(Path(result["gil_raw"]))
        result["cpu_ms_per_image_by_thread"] = {
            f"{tid} {names.get(tid, '?')}": round(1000 * v / images_in_window, 3)
            for tid, v in sorted(thread_s.items(), key=lambda kv: -kv[1])
        }
        # With front ends the forward passes run in the device's process (its "towers-image-0", ...); a front end's
        # "towers" thread only sends them there: host work.
        device_tids = set(tasks(proc.pid)) if "front_ends" in entry else set(thread_s)
        towers = sum(v for tid, v in thread_s.items() if names.get(tid, "").startswith("towers") and tid in device_tids)
        decoding = sum(v for tid, v in thread_s.items() if names.get(tid, "").startswith("decode"))
        on_device = decoding * args.device_share if mode == "device" else 0.0
        device = 1000 * (towers + on_device) / images_in_window
        result.update(
            towers_ms_per_image=1000 * towers / images_in_window,
            device_decode_ms_per_image=1000 * on_device / images_in_window,
            device_work_ms_per_image=device,
            cpu_all_ms_per_image=result["cpu_ms_per_image"],
            cpu_ms_per_image=result["cpu_ms_per_image"] - device,
        )
        project(result, args.cores, args.target)
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def sample_lock(
    pid: int, rate: int, seconds: int, raw: Path, workers: bool = False, realtime: int = 0, spy=None, also=()
):
    """py-spy reads, ``rate`` times a second for ``seconds``, which thread of ``pid`` (and with ``workers`` of the
    processes below it) holds its interpreter lock, without stopping the process, and writes those threads' stacks
    to ``raw``. With ``realtime`` (a SCHED_RR priority) every thread of ``pid`` (and of the processes ``also``: a
    server's front ends) runs on the real-time scheduler meanwhile, py-spy one priority above, and is put back
    after. -> (GIL-held samples by (process, thread id),
    samples that failed (a stack that changed while read), py-spy's output)."""
    cmd = [spy or py_spy() or "py-spy", "record", "--pid", str(pid), "--gil", "--threads", "--nonblocking"]
    cmd += ["--format", "raw", "--rate", str(rate), "--duration", str(seconds), "-o", str(raw)]
    cmd += ["--subprocesses"] if workers else []

    def policy(pids, which: int, priority: int) -> None:
        for tid in [t for p in pids for t in tasks(p)]:
            try:
                os.sched_setscheduler(tid, which, os.sched_param(priority))
            except ProcessLookupError:
                continue

    try:
        if realtime:
            policy((pid, *also), os.SCHED_RR, realtime)
        # no preexec_fn: Python run between fork and exec in a process with gRPC's threads (a client's) can crash
        sampler = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(3 if realtime else 0):  # the sampler's threads, as they start
            policy((sampler.pid,), os.SCHED_RR, realtime + 1)
            time.sleep(0.05)
        output = sampler.communicate()[0]
    finally:
        if realtime:  # threads started meanwhile inherited the policy too
            policy((pid, *also), os.SCHED_OTHER, 0)
    text = output.decode(errors="replace")
    if not raw.exists():
        raise RuntimeError(f"py-spy took no samples of process {pid} (exit status {sampler.returncode}): {text[-500:]}")
    return parse_raw(raw), sum(int(n) for n in re.findall(r"Errors: (\d+)", text)), text


async def lock_window(proc, entry, args, mode: str, workers: bool, realtime: int) -> dict:
    """One window of ``sample_lock`` over the server under load: the fraction of instants its main process held
    the lock (a failed sample counted as held by it), and in each worker process, per image scored meanwhile.
    With front ends, the main process is the device's, and each front end's lock is per image it scored (its own
    series of the counter); a failed sample counts as held by each of them."""
    loop = asyncio.get_running_loop()
    raw = args.out / f"host-{mode}{'-rt' if realtime else ''}-{git_revision()}.gil.txt"  # kept for reading
    pids = descendants(proc.pid)
    fronts = entry.get("front_ends", [])
    s0 = schedstat(pids)
    n0 = await loop.run_in_executor(None, images_by_front_end, entry["metrics_port"])
    t0 = time.perf_counter()
    counts, errors, log = await loop.run_in_executor(
        None, sample_lock, proc.pid, args.rate, args.gil_window_s, raw, workers, realtime, args.py_spy, fronts
    )
    t1 = time.perf_counter()
    n1 = await loop.run_in_executor(None, images_by_front_end, entry["metrics_port"])
    s1 = schedstat(pids)
    instants = args.rate * args.gil_window_s
    rate = (sum(n1.values()) - sum(n0.values())) / (t1 - t0)  # images/s while sampled (py-spy's start and stop too)

    def on_core(tid: int) -> float:
        """The share of a thread's runnable time it spent on a core during the sampling."""
        (r0, w0), (r1, w1) = s0.get(tid, (0, 0)), s1.get(tid, (0, 0))
        return (r1 - r0) / ((r1 - r0) + (w1 - w0)) if (r1 - r0) + (w1 - w0) else 1.0

    def key(pid: int) -> str:
        return next((k for k, _ in counts if f"process {pid}:" in k), f"process {pid}:")

    main, front_keys = key(proc.pid), [key(pid) for pid in fronts]
    held: dict[str, float] = {k: errors / instants for k in (main, *front_keys)}
    held_on_core = dict(held)
    for (process, tid), n in counts.items():
        held[process] = held.get(process, 0.0) + n / instants
        held_on_core[process] = held_on_core.get(process, 0.0) + n * on_core(tid) / instants
    front_rates = [(n1.get(str(i), 0.0) - n0.get(str(i), 0.0)) / (t1 - t0) for i in range(len(fronts))]
    extra = {}
    if fronts:
        extra = {
            "gil_front_ends_images_per_s": front_rates,
            # a front end no connection reached takes nothing in: no ceiling of its own
            "gil_front_ends_ms_per_image": [
                1000 * held[k] / r if r else float("inf") for k, r in zip(front_keys, front_rates)
            ],
            "gil_front_ends_on_core_ms_per_image": [
                1000 * held_on_core[k] / r if r else float("inf") for k, r in zip(front_keys, front_rates)
            ],
        }
    return {
        **extra,
        "gil_errors": errors,
        "gil_raw": str(raw),
        "gil_images_per_s": rate,
        "gil_samples": {f"{p} thread {t}": n for (p, t), n in counts.items()},
        "gil_instants": instants,
        "gil_held_fraction": held.get(main, 0.0),
        "gil_ms_per_image": 1000 * held.get(main, 0.0) / rate,
        "gil_on_core_ms_per_image": 1000 * held_on_core.get(main, 0.0) / rate,
        "gil_workers_ms_per_image": {p: 1000 * v / rate for p, v in held.items() if p != main and p not in front_keys},
        "py_spy_lag": [line for line in log.splitlines() if "behind" in line][:3],
    }


def project(r: dict, cores: int, target: float) -> None:
    """The ceilings of one process: cores over its CPU an image, and one over the lock its main process holds an
    image -- held on a core (the real-time window) where measured, the plain window's upper bound beside it."""

    def per_second(ms: float) -> float:
        return 1000 / ms if ms > 0 else float("inf")  # and 0 for an infinite ms: a front end that took nothing

    def lock_ceiling(prefix: str) -> float:
        """1 / the main process's lock an image; with front ends, at most what they take in together (each one
        over the lock it holds an image it scored)."""
        fronts = r.get(prefix + "gil_front_ends_ms_per_image")
        device = per_second(r[prefix + "gil_ms_per_image"])
        return min(device, sum(per_second(ms) for ms in fronts)) if fronts else device

    r["cores_over_cpu"] = cores / (r["cpu_ms_per_image"] / 1000)
    r["one_over_gil_bound"] = lock_ceiling("")
    r["one_over_gil"] = lock_ceiling("rt_" if "rt_gil_ms_per_image" in r else "")
    r["ceiling"] = min(r["cores_over_cpu"], r["one_over_gil"])
    r["ceiling_bound"] = min(r["cores_over_cpu"], r["one_over_gil_bound"])
    r["meets_target"] = r["ceiling"] >= target


LABELS = {
    "exact": "exact path (JPEG, Pillow in the server)",
    "device": "`--decode-on-device`, host part",
    "pixels": "raw pixels in (512×512×3 uint8)",
    "processes": "exact path, `--decode-processes`",
    "processes-stream": "exact path, `--decode-processes`, requests on a ScoreStream",
    "processes-reward": "exact path, `--decode-processes`, a RewardClient's batches (32 pairs)",
    "pixels-processes": "raw pixels in, `--decode-processes`",
    "pixels-processes-reward": "raw pixels in, `--decode-processes`, a RewardClient's batches (32 pairs)",
    "front-ends": "exact path, `--front-ends 2 --decode-processes`, one Score call a request",
}


def markdown(results: dict) -> str:
    cores, target = results["cores"], results["target"]
    lines = [
        f"| mode | server flags | images/s here | cores: server, client, others | "
        f"host CPU ms/image (all − device work) | "
        f"lock held, main process, ms/image: upper bound (est. on a core) | held with a core (real-time) | "
        f"{cores} cores ÷ CPU | 1 ÷ lock: bound, with a core | projected ceiling, one process | ≥ {target:,.0f}? |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results["modes"].items():
        cpu = f"{r['cpu_ms_per_image']:.2f} ({r['cpu_all_ms_per_image']:.2f} − {r['device_work_ms_per_image']:.2f})"
        label = LABELS.get(name.split("+")[0], name) + (" " + name.split("+", 1)[1] if "+" in name else "")
        rt = f"{r['rt_gil_ms_per_image']:.3f}" if "rt_gil_ms_per_image" in r else "not measured"
        lines.append(
            f"| {label} | `{' '.join(r['server_flags']) or '(defaults)'}` | {r['images_per_s']:.0f} | "
            f"{r['server_cores']:.2f}, {r['client_cores']:.2f}, {r['other_cores']:.2f} | {cpu} | "
            f"{r['gil_ms_per_image']:.3f} ({r['gil_on_core_ms_per_image']:.3f}) | {rt} | "
            f"{r['cores_over_cpu']:,.0f} | {r['one_over_gil_bound']:,.0f}, {r['one_over_gil']:,.0f} | "
            f"**{r['ceiling']:,.0f}** | {'yes' if r['meets_target'] else 'NO'} |"
        )
    notes = [
        "",
        f"Best-of-8 requests of {results['image_side']} px JPEGs, concurrency {results['concurrency']}, tiny towers "
        f"(`--compute-threads 1`), the server's threads at nice {results['nice']}, the client on the same "
        f"cores (not counted). CPU over {results['window_s']:.0f} s; the lock over {results['gil_window_s']:.0f} s at "
        f"{results['rate']} samples/s (py-spy {results['py_spy_version']}, `--nonblocking`; a failed sample counts "
        "as held), twice: as it runs (a holder waiting for a core counts too: an upper bound), then with the "
        f"server's main process on the real-time scheduler (SCHED_RR {results['realtime']}, py-spy above it: a "
        "holder is on a core whenever runnable, as where cores are to spare)"
        + ("; the ceiling uses the second" if results["realtime"] else "")
        + ". The exact path alone (`load_uint8`, one thread, in-process, just before): "
        f"{results['decode_alone_ms_per_image']:.2f} ms of CPU an image. Device work subtracted: the towers' "
        "thread"
        + (
            f", and {results['device_share']:.0%} of the decode threads' CPU with `--decode-on-device`"
            if results["device_share"]
            else ""
        )
        + ".",
    ]
    for name, r in results["modes"].items():
        if r["gil_workers_ms_per_image"]:
            shown = ", ".join(f"{v:.3f}" for v in r["gil_workers_ms_per_image"].values())
            notes.append(f"- {name}: the lock held in each worker process, ms per image the server scored: {shown}")
        if r.get("gil_front_ends_ms_per_image"):
            each = ", ".join(f"{v:.3f}" for v in r["gil_front_ends_ms_per_image"])
            rt = ", ".join(f"{v:.3f}" for v in r.get("rt_gil_front_ends_ms_per_image", []))
            rates = ", ".join(f"{v:.0f}" for v in r["gil_front_ends_images_per_s"])
            notes.append(
                f"- {name}: the lock column is the device's process; each front end's, ms per image it scored: "
                f"{each} (with a core: {rt or 'not measured'}), at {rates} images/s; the ceiling takes the smaller "
                "of the device's and the front ends' together"
            )
        if r["py_spy_lag"]:
            notes.append(f"- {name}: py-spy fell behind: {r['py_spy_lag'][0]}")
    return "\n".join(lines + notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated modes (default {','.join(MODES)})")
    p.add_argument(
        "--extra-flags",
        action="append",
        default=[],
        metavar="MODE=FLAGS",
        help="more server flags for one mode, e.g. 'processes=--decode-workers 4'; repeatable",
    )
    p.add_argument("--image-side", type=int, default=512, help="JPEG side in pixels (default 512)")
    p.add_argument("--concurrency", type=int, default=16, help="best-of-8 requests in flight (default 16)")
    p.add_argument("--max-batch-size", type=int, default=32, help="server --max-batch-size (default 32)")
    p.add_argument("--warmup-s", type=float, default=5.0, help="seconds of load before measuring (default 5)")
    p.add_argument("--window-s", type=float, default=15.0, help="seconds of the CPU window (default 15)")
    p.add_argument("--gil-window-s", type=int, default=10, help="seconds py-spy samples the lock (default 10)")
    p.add_argument("--rate", type=int, default=150, help="py-spy samples per second (default 150)")
    p.add_argument("--cores", type=int, default=16, help="cores of the projected host (default 16)")
    p.add_argument("--target", type=float, default=2400.0, help="images/s the host must feed (default 2400)")
    p.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="niceness of the server's threads, its decode workers moved as much (default -10, needs root; 0 leaves "
        "them): other loads on the machine, the client included, then rarely keep a lock holder off its core",
    )
    p.add_argument(
        "--realtime",
        type=int,
        default=10,
        help="SCHED_RR priority of the server's main process in a second lock window (default 10, needs root; 0: "
        "none, and the ceiling uses the upper bound): its lock holders then never wait for a core",
    )
    p.add_argument(
        "--py-spy", default=py_spy() or "py-spy", help="py-spy executable (default: on PATH or beside this Python)"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for JSON and markdown")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    args.extra = dict(e.split("=", 1) for e in args.extra_flags)
    args.out.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([args.py_spy, "--version"], capture_output=True, text=True).stdout.split()[-1]

    images = jpegs(32, args.image_side)
    from PIL import Image

    args.pixels = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
    args.device_share = device_share(images) if "device" in modes else 0.0
    decode_ms = decode_alone_ms(images)
    results: dict = {
        "machine": machine_with_flags(),
        "image_side": args.image_side,
        "concurrency": args.concurrency,
        "window_s": args.window_s,
        "gil_window_s": args.gil_window_s,
        "rate": args.rate,
        "cores": args.cores,
        "target": args.target,
        "py_spy_version": version,
        "nice": args.nice,
        "realtime": args.realtime,
        "device_share": args.device_share,
        "decode_alone_ms_per_image": decode_ms,
        "modes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model("tiny", Path(tmp) / "tiny")
        for mode in modes:
            print(f"{mode} ...", file=sys.stderr, flush=True)
            r = asyncio.run(measure_mode(mode, model_dir, images, args))
            name = mode + (f"+{args.extra[mode]}" if mode in args.extra else "")
            results["modes"][name] = r
            print(f"{name}: CPU ms/image by thread: {r['cpu_ms_per_image_by_thread']}", file=sys.stderr)
            print(
                f"{name}: {r['images_per_s']:.0f} images/s, CPU {r['cpu_ms_per_image']:.2f} ms/image, "
                f"GIL {r['gil_ms_per_image']:.3f} ({r['gil_on_core_ms_per_image']:.3f} on a core, "
                f"{r.get('rt_gil_ms_per_image', float('nan')):.3f} real-time) ms/image -> "
                f"ceiling {r['ceiling']:.0f}; cores: server {r['server_cores']:.2f}, client {r['client_cores']:.2f}, "
                f"others {r['other_cores']:.2f}",
                file=sys.stderr,
                flush=True,
            )
    stem = args.out / f"host-{args.image_side}px-{git_revision()}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    stem.with_suffix(".md").write_text(table + "\n")
    print(table)
    if not args.no_append:
        append_results(
            f"The host that feeds the GPU (tiny towers, {args.image_side} px JPEG, best-of-8), projected to "
            f"{args.cores} cores",
            table,
            {
                "machine": results["machine"],
                "command": "python " + " ".join(["benchmarks/host_bench.py", *(argv or sys.argv[1:])]),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
