"""Best-of-8 serving benchmark: the paper's transformers pattern vs our engine vs our gRPC server.

    python benchmarks/serve_bench.py                      # ViT-B-32 shape, CPU, 512 px JPEGs
    python benchmarks/serve_bench.py --shape vit-h-14 --device cuda --dtype bf16

One run measures, on the same JPEG bytes and prompts (every request has its own prompt, so no cache helps):
  (a) transformers CLIPModel + CLIPProcessor, one image per call (the PickScore model card's example)
  (b) the same with all 8 images in one call
  (c) our engine in-process (batcher + worker pool, no gRPC), closed loop at each concurrency
  (d) `pickscore serve` in its own process through gRPC, closed loop at each concurrency, then open loop
      (Poisson arrivals) at 70% of (d)'s saturation throughput
  (e) with --onnx: the model exported to ONNX fp32 and int8 and each served at the highest concurrency, int8
      with its rank agreement with fp32 (the exporter's verification); beside them, what an int8 GEMM gains
      over an fp32 one in ONNX Runtime on this CPU (the most int8 can give the towers here)
  (f) the overhead ceiling: a tiny-tower model served at concurrency 8 against cores x the one-thread rate of
      `load_pixels` (decode + preprocess) on the same JPEGs: what the request path itself sustains; beside it,
      what `cores` threads of `load_pixels` alone sustain at once (what the cores really give together)
  (g) the paths this CPU has (its matrix units are printed first, from /proc/cpuinfo): torch fp32; torch bf16
      where it has AMX-BF16 or AVX512-BF16; the ONNX Runtime fp32 and int8 exports. Each served at the same
      workload (concurrency --path-concurrency), with its images/s over (a) and its rank agreement with fp32 as
      the export check measures it (pickscore.exporter.verify.rank_agreement); the fastest that keeps rank
      agreement >= 0.99 is marked. --no-paths skips it
  (h) with --triton ENV: a plain Triton deployment of the same model (triton_deploy.py: the model card's code
      in Triton's Python backend, dynamic batching up to 64, 5 ms queue delay, one instance with two torch
      threads, PIL decode on two threads) beside `pickscore serve` (torch fp32), both up at once, closed loop
      at concurrency 8 in alternating runs; images/s of each, the ratio, and the CPU each server process
      (with its children) kept busy over its window
and writes JSON, a markdown table, a latency-against-throughput plot, and a section of benchmarks/RESULTS.md.
Medians of latency over requests; images/s over the whole measured window; warm-up excluded.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PER_REQUEST,
    append_results,
    closed_loop,
    git_revision,
    jpegs,
    latency_stats,
    machine,
    prompts,
    serve,
    write_model,
)


def bench_transformers(model_dir: Path, images: list[bytes], requests: int, one_per_call: bool, device: str) -> dict:
    """(a)/(b): the model card's pattern, timed per best-of-8 request."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(model_dir)
    model = CLIPModel.from_pretrained(model_dir).eval().to(device)

    def features(out):
        return getattr(out, "pooler_output", out)

    def calc_probs(prompt: str, blobs: list[bytes]) -> torch.Tensor:
        pil = [Image.open(io.BytesIO(b)) for b in blobs]
        image_inputs = processor(images=pil, return_tensors="pt").to(device)
        text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt").to(
            device
        )
        with torch.no_grad():
            img = features(model.get_image_features(**image_inputs))
            img = img / img.norm(dim=-1, keepdim=True)
            txt = features(model.get_text_features(**text_inputs))
            txt = txt / txt.norm(dim=-1, keepdim=True)
            return (model.logit_scale.exp() * txt @ img.T)[0].cpu()  # sync point

    def request(i: int, prompt: str) -> None:
        blobs = [images[(i * PER_REQUEST + k) % len(images)] for k in range(PER_REQUEST)]
        if one_per_call:
            for b in blobs:
                calc_probs(prompt, [b])
        else:
            calc_probs(prompt, blobs)

    for i, p in enumerate(prompts(2)):  # warm-up
        request(i, "warm-up " + p)
    latencies = []
    start = time.perf_counter()
    for i, p in enumerate(prompts(requests)):
        t = time.perf_counter()
        request(i, p)
        latencies.append(time.perf_counter() - t)
    return latency_stats(latencies, requests * PER_REQUEST, time.perf_counter() - start)


async def open_loop(call, images: list[bytes], rate: float, requests: int, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate`` requests/s, whatever the server's answers."""
    rng = random.Random(seed)
    names = prompts(requests)
    latencies: list[float] = []

    async def one(i: int) -> None:
        blobs = [images[(i * PER_REQUEST + k) % len(images)] for k in range(PER_REQUEST)]
        t = time.perf_counter()
        await call(names[i], blobs)
        latencies.append(time.perf_counter() - t)

    tasks = []
    start = time.perf_counter()
    at = start
    for i in range(requests):
        at += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return latency_stats(latencies, requests * PER_REQUEST, time.perf_counter() - start)


def requests_for(concurrency: int, base: int) -> int:
    return max(base, 2 * concurrency)


async def bench_engine(model_dir: Path, images, levels, base, args) -> dict[int, dict]:
    """(c): the Engine in-process, no gRPC."""
    from pickscore.backends import load_backend
    from pickscore.server.engine import Engine, ImageItem, Shared
    from pickscore.server.metrics import Metrics
    from pickscore.server.settings import Settings

    settings = Settings(
        model=str(model_dir),
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms,
        max_queue_wait_s=0,  # as the server's: closed loops measure saturation, admission by time would refuse them
    )
    shared = Shared(settings)
    backend = load_backend(str(model_dir), "auto", args.device, args.dtype)
    engine = Engine(backend, settings, Metrics().for_model("pickscore"), shared)
    await engine.start()

    async def call(prompt, blobs):
        await engine.score([prompt], [ImageItem(b) for b in blobs], None)

    await closed_loop(call, images, 2, 4)  # warm-up
    out = {c: await closed_loop(call, images, c, requests_for(c, base)) for c in levels}
    await engine.stop()
    shared.close(hung=False)
    return out


async def bench_server(address: str, images, levels, base) -> tuple[dict[int, dict], dict]:
    """(d): closed loop at each concurrency, then open loop at 70% of the best closed-loop throughput."""
    from pickscore.client import AsyncClient

    async with AsyncClient(address, timeout=600) as client:

        async def call(prompt, blobs):
            await client.score(prompt, blobs)

        await closed_loop(call, images, 2, 4)  # warm-up
        closed = {c: await closed_loop(call, images, c, requests_for(c, base)) for c in levels}
        saturation = max(r["images_per_s"] for r in closed.values()) / PER_REQUEST  # requests/s
        unloaded = closed[min(levels)]["p50_ms"]
        at70 = await open_loop(call, images, 0.7 * saturation, requests_for(max(levels), base))
        at70.update(
            rate_requests_per_s=0.7 * saturation,
            unloaded_p50_ms=unloaded,
            p99_over_unloaded_p50=at70["p99_ms"] / unloaded,
        )
        return closed, at70


def start_server(model_dir: Path, args, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    # closed loops measure saturation: admission by time (--max-queue-wait-s) would refuse the deepest ones
    proc, entry = serve(
        model_dir,
        *("--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size)),
        *("--max-queue-delay-ms", str(args.max_queue_delay_ms), "--max-queue-wait-s", "0", *extra),
    )
    return proc, f"127.0.0.1:{entry['port']}"


def decode_rate(images: list[bytes], seconds: float = 5.0, offset: int = 0) -> float:
    """Images/s of one thread running load_pixels (decode + resize + crop + normalise) over ``images``."""
    from pickscore.model.preprocess import PreprocessConfig, load_pixels

    cfg, n, start = PreprocessConfig(), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        load_pixels(images[(n + offset) % len(images)], cfg)
        n += 1
    return n / (time.perf_counter() - start)


def parallel_decode_rate(images: list[bytes], threads: int) -> float:
    """Images/s of ``threads`` threads each running load_pixels at once (Pillow releases the interpreter lock)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda k: decode_rate(images, offset=7 * k), range(threads)))


def serve_and_measure(model_dir: Path, args, images, concurrency: int, requests: int, extra=()) -> dict:
    proc, address = start_server(model_dir, args, extra)
    try:

        async def run() -> dict:
            from pickscore.client import AsyncClient

            async with AsyncClient(address, timeout=600) as client:

                async def call(prompt, blobs):
                    await client.score(prompt, blobs)

                await closed_loop(call, images, 2, 4)  # warm-up
                return await closed_loop(call, images, concurrency, requests)

        return asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def bench_ceiling(images, args, tmp: Path) -> dict:
    """(f): the tiny model's server throughput over cores x one-thread decode rate, measured back to back."""
    from pickscore.resources import usable_cores

    tiny = write_model("tiny", tmp / "tiny")
    cores = usable_cores()
    rate = decode_rate(images)
    together = parallel_decode_rate(images, cores)
    served = serve_and_measure(tiny, args, images, 8, 8 * args.requests)
    return {
        "decode_one_thread_images_per_s": rate,
        "decode_all_cores_images_per_s": together,
        "cores": cores,
        **served,
        "ratio": served["images_per_s"] / (cores * rate),
        "ratio_to_all_cores": served["images_per_s"] / together,
    }


def bench_export(model_dir: Path, precision: str, images, args, tmp: Path, concurrency: int) -> dict:
    """(e): export at ``precision``, serve it, and report its rank agreement with fp32 from the export's check."""
    from pickscore.exporter.onnx import export_onnx

    manifest = export_onnx(str(model_dir), tmp / precision, precision=precision, min_agreement=0.0)
    served = serve_and_measure(
        tmp / precision,
        args,
        images,
        concurrency,
        requests_for(concurrency, args.requests),
        extra=("--backend", "onnxruntime"),
    )
    return {**served, "rank_agreement": manifest["verification"].get("rank_agreement")}


def path_agreement(candidate, model_dir: Path) -> float:
    """Rank agreement of ``candidate`` (a Backend) with the model's torch fp32 on best-of-8 sets: the export
    check's own inputs and function (pickscore.exporter.verify)."""
    from pickscore.backends.torch_backend import TorchBackend
    from pickscore.exporter.verify import PER_SET, SETS, rank_agreement, verification_inputs

    reference = TorchBackend.from_ref(str(model_dir), device="cpu", dtype="fp32")
    pixels, tokens = verification_inputs(reference.preprocess, reference.tokenizer, SETS * PER_SET)
    return rank_agreement(candidate, reference, pixels, tokens)


def bench_paths(model_dir: Path, images, args, tmp: Path, flags: frozenset[str], baseline: float) -> dict:
    """(g): every path this CPU has, served at the same workload, with its rank agreement with torch fp32."""
    from pickscore.backends.onnx_backend import OnnxBackend
    from pickscore.backends.torch_backend import TorchBackend
    from pickscore.exporter.onnx import export_onnx
    from pickscore.resources import BF16_FLAGS

    c = args.path_concurrency
    n = requests_for(c, args.requests)
    cpu_args = argparse.Namespace(**{**vars(args), "device": "cpu"})
    out: dict[str, dict] = {}
    print("(g) torch fp32", file=sys.stderr)
    fp32 = argparse.Namespace(**{**vars(cpu_args), "dtype": "fp32"})
    out["torch fp32"] = {**serve_and_measure(model_dir, fp32, images, c, n), "rank_agreement": 1.0}
    if any(f in flags for f in BF16_FLAGS):
        print("(g) torch bf16", file=sys.stderr)
        bf16 = argparse.Namespace(**{**vars(cpu_args), "dtype": "bf16"})
        agreement = path_agreement(TorchBackend.from_ref(str(model_dir), device="cpu", dtype="bf16"), model_dir)
        out["torch bf16"] = {**serve_and_measure(model_dir, bf16, images, c, n), "rank_agreement": agreement}
    else:
        out["torch bf16"] = {"skipped": "no bf16 matrix units (AMX-BF16, AVX512-BF16): emulated, slower than fp32"}
    for precision in ("fp32", "int8"):
        print(f"(g) ONNX Runtime {precision}", file=sys.stderr)
        directory = tmp / f"path-onnx-{precision}"
        manifest = export_onnx(str(model_dir), directory, precision=precision, min_agreement=0.0)
        agreement = manifest["verification"].get("rank_agreement")  # the int8 export's own check
        if agreement is None:
            agreement = path_agreement(OnnxBackend(directory), model_dir)
        served = serve_and_measure(directory, fp32, images, c, n, extra=("--backend", "onnxruntime"))
        out[f"onnx {precision}"] = {**served, "rank_agreement": agreement}
    for r in out.values():
        if "images_per_s" in r:
            r["over_a"] = r["images_per_s"] / baseline
    kept = {name: r for name, r in out.items() if r.get("rank_agreement", 0) >= 0.99}
    best = max(kept, key=lambda name: kept[name]["images_per_s"])
    return {"concurrency": c, "paths": out, "best": best}


def bench_triton(model_dir: Path, images, args, tmp: Path) -> dict:
    """(h): Triton (the model card's code in its Python backend) and `pickscore serve` (torch fp32), both up,
    alternating closed-loop runs at --triton-concurrency; images/s and each server's CPU over its window."""
    import numpy as np
    from triton_deploy import CpuMeter, find_tritonserver, start_triton, triton_caller, write_repository

    from pickscore.client import AsyncClient
    from pickscore.resources import usable_cores

    home = find_tritonserver(args.triton)
    repo = write_repository(model_dir, tmp / "triton" / "repo")
    cores = usable_cores()
    c, n = args.triton_concurrency, args.triton_requests
    ours_args = argparse.Namespace(**{**vars(args), "device": "cpu", "dtype": "fp32"})
    ours_proc, ours_address = start_server(model_dir, ours_args)
    try:
        triton_proc, triton_address = start_triton(repo, home)
    except BaseException:
        ours_proc.terminate()
        raise
    procs = {"pickscore": ours_proc, "triton": triton_proc}

    async def run() -> dict:
        triton_call, triton_client = triton_caller(triton_address)
        try:
            async with AsyncClient(ours_address, timeout=600) as client:

                async def ours_call(prompt, blobs):
                    return await client.score(prompt, blobs)

                calls = {"pickscore": ours_call, "triton": triton_call}
                version = (await triton_client.get_server_metadata()).version
                same = prompts(1)[0], images[:PER_REQUEST]
                ours_scores = np.asarray(await ours_call(*same))
                triton_scores = np.asarray(await triton_call(*same)).reshape(-1)
                for call in calls.values():  # warm-up
                    await closed_loop(call, images, c, 2 * c)
                runs: list[dict] = []
                for k in range(args.triton_runs):
                    run: dict = {}
                    for name, call in calls.items():
                        other = procs["triton" if name == "pickscore" else "pickscore"]
                        meters = CpuMeter(procs[name].pid, cores), CpuMeter(other.pid, cores)
                        client_cpu = time.process_time()  # this process alone: both servers are its children
                        t = time.perf_counter()
                        r = await closed_loop(call, images, c, n)
                        r["cpu"], r["other_server_cpu"] = meters[0].utilisation(), meters[1].utilisation()
                        client_cpu = time.process_time() - client_cpu
                        r["client_cpu"] = client_cpu / (time.perf_counter() - t) / cores
                        run[name] = r
                        print(
                            f"(h) run {k + 1} {name}: {r['images_per_s']:.2f} images/s, CPU {r['cpu']:.0%}",
                            file=sys.stderr,
                        )
                    run["ratio"] = run["pickscore"]["images_per_s"] / run["triton"]["images_per_s"]
                    runs.append(run)
                return {
                    "triton_version": version,
                    "concurrency": c,
                    "requests_per_run": n,
                    "runs": runs,
                    "max_abs_score_difference": float(np.abs(ours_scores - triton_scores).max()),
                    "same_order": bool((np.argsort(-ours_scores) == np.argsort(-triton_scores)).all()),
                }
        finally:
            await triton_client.close()

    try:
        return asyncio.run(run())
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def gemm_int8_over_fp32(m: int = 800, k: int = 768, n: int = 3072) -> float:
    """How much faster ONNX Runtime multiplies uint8 x int8 (MatMulInteger, what the int8 export runs) than
    float32 on this CPU, for a ViT-B-32 MLP-sized product on every usable core: the most int8 can give here."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pickscore.resources import usable_cores

    def seconds(op: str, x: np.ndarray, w: np.ndarray, out_type: int) -> float:
        graph = helper.make_graph(
            [helper.make_node(op, ["x", "w"], ["y"])],
            op,
            [helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(x.dtype), [m, k])],
            [helper.make_tensor_value_info("y", out_type, [m, n])],
            [numpy_helper.from_array(w, "w")],
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = usable_cores()
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {"x": x})
        times = []
        for _ in range(15):
            start = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    rng = np.random.default_rng(0)
    fp32 = seconds("MatMul", rng.random((m, k), np.float32), rng.random((k, n), np.float32), TensorProto.FLOAT)
    int8 = seconds(
        "MatMulInteger",
        rng.integers(0, 256, (m, k), dtype=np.uint8),
        rng.integers(-127, 128, (k, n), dtype=np.int8),
        TensorProto.INT32,
    )
    return fp32 / int8


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, marker in (("engine", "(c) engine in-process", "s"), ("server", "(d) gRPC server", "o")):
        pts = sorted(results[key].items())
        ax.plot([r["images_per_s"] for _, r in pts], [r["p50_ms"] for _, r in pts], marker=marker, label=f"{label} p50")
        ax.plot(
            [r["images_per_s"] for _, r in pts],
            [r["p99_ms"] for _, r in pts],
            marker=marker,
            linestyle="--",
            label=f"{label} p99",
        )
        for c, r in pts:
            ax.annotate(
                f"c={c}", (r["images_per_s"], r["p50_ms"]), fontsize=7, textcoords="offset points", xytext=(3, 3)
            )
    for key, label in (
        ("transformers_one_per_call", "(a) transformers, 1 image/call"),
        ("transformers_batched", "(b) transformers, 8 images/call"),
    ):
        r = results[key]
        ax.scatter([r["images_per_s"]], [r["p50_ms"]], marker="x", s=60, label=f"{label} p50")
    r = results["server_at_70pct"]
    ax.scatter([r["images_per_s"]], [r["p99_ms"]], marker="*", s=120, label="(d) p99, open loop at 70% saturation")
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("request latency, best-of-8 (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{results['shape']} on {results['device']}: latency against throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def markdown(results: dict) -> str:
    rows = [
        ("(a) transformers, one image per call", results["transformers_one_per_call"]),
        ("(b) transformers, 8 images per call", results["transformers_batched"]),
    ]
    rows += [(f"(c) engine in-process, concurrency {c}", r) for c, r in sorted(results["engine"].items())]
    rows += [(f"(d) gRPC server, concurrency {c}", r) for c, r in sorted(results["server"].items())]
    r70 = results["server_at_70pct"]
    rows.append((f"(d) gRPC server, open loop at 70% saturation ({r70['rate_requests_per_s']:.2f} req/s)", r70))
    if "onnx" in results:
        c = max(results["server"])
        rows.append((f"(e) gRPC server, ONNX fp32 export, concurrency {c}", results["onnx"]["fp32"]))
        rows.append(
            (
                f"(e) gRPC server, ONNX int8 export, concurrency {c} "
                f"(rank agreement with fp32 {results['onnx']['int8']['rank_agreement']:.3f})",
                results["onnx"]["int8"],
            )
        )
    base = results["transformers_one_per_call"]["images_per_s"]
    cpu = results["cpu"]
    lines = [
        f"CPU: {cpu['model']}, {cpu['cores']} usable cores; of {', '.join(cpu['checked'])} it has "
        f"**{', '.join(cpu['flags']) or 'none'}**; the path suggested for it (`pickscore.resources.cpu_path`): "
        f"**{cpu['suggested_path']}**",
        "",
        "| setup | images/s | × (a) | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / base:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |"
        for name, r in rows
    ]
    t = results["targets"]
    f = results["ceiling"]
    lines += [
        "",
        f"- (f) overhead ceiling: tiny-tower server at concurrency 8 **{f['images_per_s']:.0f} images/s** = "
        f"**{f['ratio']:.2f}×** ({f['cores']} cores × one-thread `load_pixels` "
        f"{f['decode_one_thread_images_per_s']:.0f} images/s) (target ≥ 0.8×) — "
        f"{'met' if f['ratio'] >= 0.8 else 'NOT met'}; {f['cores']} threads of `load_pixels` alone at once: "
        f"{f['decode_all_cores_images_per_s']:.0f} images/s, the server {f['ratio_to_all_cores']:.2f}× that",
        f"- concurrency 1: server p50 / transformers' one call for 8 p50: **{t['c1_over_b']:.2f}×** (target ≤ 1.1×) — "
        f"{'met' if t['c1_over_b'] <= 1.1 else 'NOT met'}",
        f"- (d) best / (a): **{t['d_over_a']:.2f}×** (target ≥ 2.5×) — {'met' if t['d_over_a'] >= 2.5 else 'NOT met'}",
        f"- (d) best / (c) best: **{t['d_over_c']:.2f}×** (target ≥ 0.95×) — "
        f"{'met' if t['d_over_c'] >= 0.95 else 'NOT met'}",
        *(
            [
                f"- (e) ONNX fp32 export served / (a): **{t['onnx_fp32_over_a']:.2f}×** (target ≥ 2.5×) — "
                f"{'met' if t['onnx_fp32_over_a'] >= 2.5 else 'NOT met'}; / (c): {t['onnx_fp32_over_c']:.2f}×",
                f"- (e) int8 served / fp32 server (torch): **{t['int8_over_fp32']:.2f}×**, / ONNX fp32 export served: "
                f"**{t['int8_over_onnx_fp32']:.2f}×** (target ≥ 2×) — "
                f"{'met' if t['int8_over_fp32'] >= 2 else 'NOT met'}; an int8 GEMM is "
                f"{results['onnx']['gemm_int8_over_fp32']:.2f}× an fp32 one in ONNX Runtime on this CPU",
            ]
            if "onnx" in results
            else []
        ),
        f"- p99 at 70% saturation / unloaded p50: **{t['p99_70_over_p50']:.2f}×** (target ≤ 3×) — "
        f"{'met' if t['p99_70_over_p50'] <= 3 else 'NOT met'}",
    ]
    if "paths" in results:
        lines += ["", *markdown_paths(results["paths"], results["image_side"])]
    if "triton" in results:
        lines += ["", *markdown_triton(results["triton"])]
    return "\n".join(lines)


def markdown_paths(g: dict, side: int) -> list[str]:
    lines = [
        f"(g) each path this CPU has, served at concurrency {g['concurrency']} (best-of-8 {side} px JPEGs):",
        "",
        "| path | images/s | × (a) | rank agreement with fp32 | p50 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in g["paths"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | |")
            continue
        mark = " **(best that keeps ranking)**" if name == g["best"] else ""
        lines.append(
            f"| {name}{mark} | {r['images_per_s']:.1f} | {r['over_a']:.2f} | {r['rank_agreement']:.3f} | "
            f"{r['p50_ms']:.0f} |"
        )
    best = g["paths"][g["best"]]
    lines += [
        "",
        f"- (g) best path that keeps ranking ({g['best']}, rank agreement {best['rank_agreement']:.3f}) / (a): "
        f"**{best['over_a']:.2f}×** (target ≥ 2.5×) — {'met' if best['over_a'] >= 2.5 else 'NOT met'}",
    ]
    return lines


def markdown_triton(h: dict) -> list[str]:
    lines = [
        f"(h) `pickscore serve` (torch fp32) and Triton {h['triton_version']} (Python backend: dynamic "
        "batching, max batch 64, 5 ms queue delay, one instance with two torch threads, PIL decode on two "
        f"threads), both up, closed loop at concurrency {h['concurrency']}, {h['requests_per_run']} best-of-8 "
        "requests a run, alternating. CPU: the server process and its children over its window, as a share of "
        "the usable cores (the client shares them):",
        "",
        "| run | pickscore images/s | CPU | Triton images/s | CPU | pickscore / Triton |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, run in enumerate(h["runs"], 1):
        ours, triton = run["pickscore"], run["triton"]
        lines.append(
            f"| {k} | {ours['images_per_s']:.2f} | {ours['cpu']:.0%} | {triton['images_per_s']:.2f} | "
            f"{triton['cpu']:.0%} | {run['ratio']:.2f} |"
        )
    ratios = [run["ratio"] for run in h["runs"]]
    lines += [
        "",
        f"- (h) pickscore / Triton: **{min(ratios):.2f}-{max(ratios):.2f}×** (target ≥ 1.1×) — "
        f"{'met' if min(ratios) >= 1.1 else 'NOT met'}; the same request's scores differ by at most "
        f"{h['max_abs_score_difference']:.2g} (Triton preprocesses with `CLIPProcessor`), same order: "
        f"{h['same_order']}",
    ]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="vit-b-32", choices=["vit-b-32", "vit-h-14"], help="model shape, random weights")
    p.add_argument("--model", default=None, help="benchmark this model directory instead of a random-weight shape")
    p.add_argument("--device", default="cpu", help="torch device for every setup (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="precision of (c) and (d)")
    p.add_argument("--image-side", type=int, default=512, help="JPEG side in pixels (default 512)")
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop concurrency levels (default 1,8,32)")
    p.add_argument(
        "--requests", type=int, default=8, help="best-of-8 requests per measured point, at least 2x concurrency"
    )
    p.add_argument("--baseline-requests", type=int, default=4, help="requests for (a) and (b) (default 4)")
    p.add_argument("--max-batch-size", type=int, default=32, help="server/engine max_batch_size (default 32)")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0, help="server/engine max_queue_delay_ms (default 5)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for JSON, markdown and PNG")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also export the model to ONNX fp32 and int8 and serve each at the highest concurrency (e)",
    )
    p.add_argument("--no-paths", action="store_true", help="skip (g), serving each path this CPU has")
    p.add_argument("--path-concurrency", type=int, default=8, help="closed-loop concurrency of (g) (default 8)")
    p.add_argument(
        "--triton",
        nargs="?",
        const="",
        default=None,
        metavar="ENV",
        help="also serve the model on Triton (h), from the nvidia-pytriton wheel installed in the virtualenv ENV "
        "(python -m venv ENV && ENV/bin/pip install nvidia-pytriton: it pins numpy<2, so not in this one), or "
        "importable here when ENV is left out",
    )
    p.add_argument("--triton-runs", type=int, default=3, help="alternating runs of each server in (h) (default 3)")
    p.add_argument("--triton-requests", type=int, default=48, help="best-of-8 requests per run in (h) (default 48)")
    p.add_argument("--triton-concurrency", type=int, default=8, help="closed-loop concurrency of (h) (default 8)")
    args = p.parse_args(argv)
    from pickscore.resources import MATRIX_FLAGS, cpu_features, cpu_path, usable_cores

    features = cpu_features()
    cpu = {
        "model": features.model,
        "cores": usable_cores(),
        "checked": list(MATRIX_FLAGS),
        "flags": [f for f in MATRIX_FLAGS if f in features.flags],
        "suggested_path": cpu_path(features.flags),
    }
    print(
        f"CPU: {cpu['model']}, {cpu['cores']} usable cores; "
        + ", ".join(f"{f} {'yes' if f in features.flags else 'no'}" for f in MATRIX_FLAGS)
        + f"; suggested path: {cpu['suggested_path']}",
        file=sys.stderr,
    )
    levels = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    images = jpegs(32, args.image_side)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else write_model(args.shape, Path(tmp) / args.shape)
        results: dict = {
            "shape": args.model or args.shape,
            "device": args.device,
            "dtype": args.dtype,
            "image_side": args.image_side,
            "machine": machine(),
            "cpu": cpu,
        }
        print("(a) transformers, one image per call", file=sys.stderr)
        results["transformers_one_per_call"] = bench_transformers(
            model_dir, images, args.baseline_requests, True, args.device
        )
        print("(b) transformers, 8 images per call", file=sys.stderr)
        results["transformers_batched"] = bench_transformers(
            model_dir, images, args.baseline_requests, False, args.device
        )
        print("(c) engine in-process", file=sys.stderr)
        results["engine"] = asyncio.run(bench_engine(model_dir, images, levels, args.requests, args))
        print("(d) gRPC server", file=sys.stderr)
        proc, address = start_server(model_dir, args)
        try:
            results["server"], results["server_at_70pct"] = asyncio.run(
                bench_server(address, images, levels, args.requests)
            )
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if args.onnx:
            print("(e) gRPC server, ONNX fp32 and int8 exports", file=sys.stderr)
            results["onnx"] = {
                precision: bench_export(model_dir, precision, images, args, Path(tmp), max(levels))
                for precision in ("fp32", "int8")
            }
            results["onnx"]["gemm_int8_over_fp32"] = gemm_int8_over_fp32()
        print("(f) overhead ceiling", file=sys.stderr)
        results["ceiling"] = bench_ceiling(images, args, Path(tmp))
        if not args.no_paths:
            baseline = results["transformers_one_per_call"]["images_per_s"]
            results["paths"] = bench_paths(model_dir, images, args, Path(tmp), features.flags, baseline)
        if args.triton is not None:
            print("(h) Triton beside pickscore serve", file=sys.stderr)
            results["triton"] = bench_triton(model_dir, images, args, Path(tmp))

    best_d = max(r["images_per_s"] for r in results["server"].values())
    best_c = max(r["images_per_s"] for r in results["engine"].values())
    results["targets"] = {
        "d_over_a": best_d / results["transformers_one_per_call"]["images_per_s"],
        "d_over_c": best_d / best_c,
        "p99_70_over_p50": results["server_at_70pct"]["p99_over_unloaded_p50"],
        "c1_over_b": results["server"][min(levels)]["p50_ms"] / results["transformers_batched"]["p50_ms"],
    }
    if "onnx" in results:
        onnx_fp32, int8 = results["onnx"]["fp32"]["images_per_s"], results["onnx"]["int8"]["images_per_s"]
        results["targets"].update(
            onnx_fp32_over_a=onnx_fp32 / results["transformers_one_per_call"]["images_per_s"],
            onnx_fp32_over_c=onnx_fp32 / best_c,
            int8_over_fp32=int8 / best_d,
            int8_over_onnx_fp32=int8 / onnx_fp32,
        )
    # one set of files per run (shape, device, precision, commit): a later run does not overwrite this one's plot
    name = f"serve-{results['shape'].replace('/', '_')}-{args.device.replace(':', '')}-{args.dtype}-{git_revision()}"
    stem = args.out / name
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    stem.with_suffix(".md").write_text(table + "\n")
    plot(results, stem.with_suffix(".png"))
    print(table)
    if not args.no_append:
        append_results(
            f"Serving, best-of-8, {results['shape']} {args.device} {args.dtype}, {args.image_side} px JPEG",
            table + f"\n\n![latency against throughput](results/{stem.name}.png)",
            {
                "machine": results["machine"],
                "command": "python " + " ".join(["benchmarks/serve_bench.py", *(argv or sys.argv[1:])]),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
