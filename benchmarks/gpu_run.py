"""The whole GPU measurement in one call: roofline, towers, `pickscore serve` end to end, fidelity, training.

    python benchmarks/gpu_run.py --out DIR                # a CUDA machine: ViT-H-14 shape, bf16, about 8 minutes
    python benchmarks/gpu_run.py --cpu-smoke --out DIR    # every section with tiny shapes on the CPU, under a minute

On a machine without network (docs/GPU.md): `python benchmarks/gpu_wheels.py` here fetches the wheels it lacks.

Sections, in order, each in its own process with its own time budget (--budget-s shares it out). One that runs
past its budget is killed with what it started (servers too); what it had measured is kept and the section is
reported "over budget", so one slow part cannot lose the rest:

  model           ViT-H-14 with random weights (PickScore_v1's shape) in this project's layout, best-of-8 JPEGs
  roofline        the device's measured bf16 matrix-product rate: the denominator of every "of roofline"
  tower           the image tower alone, eager, at batch 32/128/256: images/s and fraction of the roofline
  serve           `pickscore serve` end to end, best-of-8 requests of 512 px JPEGs from client processes at
                  concurrency 32 and 128: the exact path (one Score call a request, and through a RewardClient),
                  --decode-on-device, and raw pixels in; images/s,
                  p50/p99, GPU utilisation, server CPU; and a profile of one loaded second (py-spy): where the
                  server's threads spend it (decode, preprocess, copy, compute, Python)
  fidelity        bf16 and fp16 against fp32 on the same device: largest score difference, pairwise rank
                  agreement over best-of-8 sets, the rate of exact ties; nvJPEG decode against the exact path
  training        the pickscore-clip-h preset's step (AdamW, bf16 autocast) with gradient checkpointing on and
                  off, micro-batch doubled until it no longer fits: samples/s, peak memory, MFU
  tower-compiled  the image tower through torch.compile as the server compiles it, at the same batches
  serve-compiled  `pickscore serve --compile` (CUDA graphs per batch bucket) at the same load
  serve-front-ends  `pickscore serve --front-ends 2 --decode-processes` at the same load, each caller on a
                  connection of its own (the kernel spreads front ends by connection); the profile covers the
                  front ends too

Writes DIR/gpu-run.json (everything, with the device, driver, torch version and commit), DIR/gpu-run.md,
DIR/gpu-run.png, and appends the markdown to benchmarks/RESULTS.md (unless --no-append). The model has random
weights: speed and numerical fidelity do not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PER_REQUEST,
    append_results,
    best_of_8,
    git_revision,
    jpegs,
    machine,
    py_spy,
    serve,
    tree_cpu_seconds,
    write_open_clip_model,
)
from load import drive  # noqa: E402

# The two profiles: what a GPU run measures, and the same code paths at sizes a 2-core CPU runs in seconds.
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": dict(
        shape="vit-h-14",
        device="cuda",
        dtype="bf16",
        matmul=8192,
        tower_batches=(32, 128, 256),
        side=512,
        concurrency=(32, 128),
        max_batch_size=128,
        client_processes=4,
        requests_per_caller=8,
        profiled_requests_per_caller=8,
        fidelity_sets=64,
        train_preset="pickscore-clip-h",
        micro_batches=(16, 32, 64, 128, 256),
        train_steps=3,
    ),
    "smoke": dict(
        shape="tiny",
        device="cpu",
        dtype="fp32",
        matmul=256,
        tower_batches=(2, 4),
        side=128,
        concurrency=(2,),
        max_batch_size=8,
        client_processes=1,
        requests_per_caller=2,
        profiled_requests_per_caller=16,  # the profiled level's load outlasts the profile's second
        fidelity_sets=2,
        train_preset="tiny",
        micro_batches=(2, 4),
        train_steps=2,
    ),
}
# Each section's seconds on a GPU and in the smoke (Python's and torch's start-up included); --budget-s scales them.
BUDGETS = {
    "model": (45, 15),
    "roofline": (20, 10),
    "tower": (35, 10),
    "serve": (150, 50),
    "fidelity": (40, 15),
    "training": (55, 15),
    "tower-compiled": (45, 20),
    "serve-compiled": (50, 30),
    "serve-front-ends": (40, 30),
}
SECTIONS = list(BUDGETS)
SERVE_SECTIONS = ("serve", "serve-compiled", "serve-front-ends")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROFILE_RATE = 250  # py-spy samples per second per thread, for the one loaded second
START = time.perf_counter()  # this process's start: when a section's steps happened


# -- the sections' shared state: a work directory and a JSON file per section, written as results come in --


class Section:
    """One section's results, saved after every measurement so a section killed at its budget keeps them."""

    def __init__(self, work: Path, name: str, profile: dict[str, Any]):
        self.work, self.name, self.p = work, name, profile
        self.path = work / f"{name}.json"
        self.data: dict[str, Any] = {}

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=2, default=float))
        print(f"[{self.name}] {key}: {json.dumps(value, default=float)[:300]}", file=sys.stderr, flush=True)

    def read(self, other: str) -> dict[str, Any]:
        path = self.work / f"{other}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def model_dir(self) -> Path:
        return self.work / "model"

    def roofline_flops(self) -> float | None:
        return self.read("roofline").get("flops_per_s")


def timed(fn: Callable[[], Any], device: str, min_s: float = 1.0, min_iters: int = 3, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` over at least ``min_iters`` calls and ``min_s`` seconds, after warm-up."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_s:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def model_flops(cfg: dict[str, Any]) -> tuple[float, float]:
    """(FLOPs of one image through the image tower, FLOPs of one 77-token prompt through the text tower), counted
    by torch's FLOP counter on the meta device (ViT-H-14: 334.6 G per image)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pickscore.model import architecture

    model = architecture.build(cfg, device="meta")
    model.attn_mask = model.attn_mask.to("meta")
    size = cfg["vision_cfg"]["image_size"]
    counts = []
    for run in (
        lambda: model.encode_image(torch.empty(1, 3, size, size, device="meta")),
        lambda: model.encode_text(
            torch.zeros(1, cfg["text_cfg"].get("context_length", 77), dtype=torch.long).to("meta")
        ),
    ):
        with FlopCounterMode(display=False) as counter:
            run()
        counts.append(float(counter.get_total_flops()))
    return counts[0], counts[1]


def loaded_model_cfg(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "open_clip_config.json").read_text())["model_cfg"]


# -- sections ---------------------------------------------------------------------------------------------------


def section_model(s: Section) -> None:
    start = time.perf_counter()
    write_open_clip_model(s.p["shape"], s.model_dir, device=s.p["device"])
    image_flops, text_flops = model_flops(loaded_model_cfg(s.model_dir))
    s.put("model", {"shape": s.p["shape"], "seconds": time.perf_counter() - start})
    s.put("flops", {"image": image_flops, "text": text_flops})


def section_roofline(s: Section) -> None:
    n, device = s.p["matmul"], s.p["device"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # a CPU without AMX multiplies bf16 slowly
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = timed(lambda: a @ b, device, min_s=0.5, min_iters=10, warmup=3)
    s.put("matmul", {"n": n, "dtype": str(dtype).removeprefix("torch."), "seconds": seconds})
    s.put("flops_per_s", 2 * n**3 / seconds)


def tower_rates(s: Section, compiled: bool) -> None:
    from pickscore.backends.torch_backend import TorchBackend
    from pickscore.model.checkpoint import resolve

    device, dtype = s.p["device"], DTYPES[s.p["dtype"]]
    backend = TorchBackend(resolve(s.model_dir), device=device, dtype=dtype, compile=compiled)
    tower = backend._image_tower  # eager, or compiled exactly as the server compiles it
    image_flops = s.read("model")["flops"]["image"]
    roofline = s.roofline_flops()
    size = backend.preprocess.crop_size
    rows = []
    batches = s.p["tower_batches"]
    if compiled:  # each size compiles first (tens of seconds on a GPU): the middle one, the most telling, first
        batches = sorted(batches, key=lambda b: abs(b - statistics.median(batches)))
    for batch in batches:
        x = torch.randn(batch, 3, *size, device=device, dtype=dtype)
        with torch.inference_mode():
            start = time.perf_counter()
            tower(x)  # compiles this shape when compiled
            first = time.perf_counter() - start
            seconds = timed(lambda x=x: tower(x), device)
        rate = batch / seconds
        rows.append(
            {
                "batch": batch,
                "images_per_s": rate,
                "of_roofline": rate * image_flops / roofline if roofline else None,
                "first_call_s": first,
            }
        )
        s.put("rows", rows)


def section_tower(s: Section) -> None:
    tower_rates(s, compiled=False)


def section_tower_compiled(s: Section) -> None:
    tower_rates(s, compiled=True)


class GpuSampler:
    """GPU utilisation (NVML's per-interval busy percentage) sampled every 100 ms in a thread."""

    def __init__(self):
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._read = None
        with contextlib.suppress(Exception):  # no NVML (a CPU run): nothing to sample
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu

    def __enter__(self) -> GpuSampler:
        if self._read:
            threading.Thread(target=self._loop, daemon=True).start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(self._read())

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


# Where a sampled stack spends its time: its innermost frame that names a stage. Frames are keyed by where their
# code lives ("pickscore:", "PIL:" or "other:") and their (qualified) name as py-spy prints it: Pillow decodes
# lazily, so a JPEG's decode can happen under crop_uint8, inside Pillow's ImageFile.load.
STAGES = {
    "decode": {"pickscore:decode_image", "pickscore:crop_on_device", "PIL:ImageFile.load", "PIL:open"},
    "preprocess": {
        "pickscore:crop_uint8",
        "pickscore:from_pixels",
        "pickscore:to_rgb",
        "pickscore:normalize",
        "pickscore:DeviceNormalizer.__call__",
    },
    "copy": {"pickscore:TorchBackend._to_device"},
    "compute": {
        "pickscore:TorchBackend._run",
        "pickscore:OnnxBackend.encode_image",
        "pickscore:OnnxBackend.encode_text",
    },
}


def frame_key(frame: str) -> str:
    """py-spy's ``name (path:line)`` -> ``origin:name``."""
    name, _, where = frame.partition(" (")
    origin = "pickscore" if "pickscore/" in where else "PIL" if "PIL/" in where else "other"
    return f"{origin}:{name}"


def stage_of(frames: list[str]) -> str:
    """The stage of a sampled stack (outermost frame first); "python" when no frame names one."""
    for frame in reversed(frames):
        key = frame_key(frame)
        for stage, keys in STAGES.items():
            if key in keys:
                return stage
    return "python"


def profile_second(pid: int, seconds: int = 1, tree: bool = False) -> dict[str, Any]:
    """py-spy's samples of every thread of the server (``tree``: and of the processes below it) for ``seconds``,
    each attributed to a stage (or to the Python of the server itself: gRPC, asyncio, batching): the share of busy
    samples per stage, and how many threads were busy on average. Idle threads (waiting on a lock, a socket) are
    not sampled."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "stacks.txt"
        spy = py_spy()
        if spy is None:
            return {"profile": "not taken: py-spy is not installed (the dev extra; docs/GPU.md carries its wheel)"}
        cmd = [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(PROFILE_RATE)]
        cmd += ["--format", "raw", "--nonblocking", "-o", str(raw), *(["--subprocesses"] if tree else [])]
        try:
            subprocess.run(cmd, capture_output=True, timeout=60 + seconds, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            return {"profile": f"not taken: {type(e).__name__}: {getattr(e, 'stderr', b'') or e}"[:300]}
        stages: Counter[str] = Counter()
        leaves: Counter[str] = Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            stages[stage_of(frames)] += int(count)
            leaves[frames[-1]] += int(count)
    total = sum(stages.values()) or 1
    return {
        "profile": {
            "busy_threads": total / (PROFILE_RATE * seconds),
            "share": {k: v / total for k, v in stages.most_common()},
            "top_frames": {k: v / total for k, v in leaves.most_common(8)},
        }
    }


def serve_variants(s: Section, servers: list[tuple[list[str], list[str]]], front_ends: bool = False) -> None:
    """Per (server flags, variants served by it): start it once, then drive each variant at each concurrency.
    Variant "pixels" sends the JPEGs' decoded uint8 pixels; the others send the JPEGs, "reward" through a
    RewardClient per client process (an RL trainer's: several requests' pairs in one), the rest one Score call a
    request. ``front_ends``: each caller has a connection of its own, and the profile samples the server's
    processes below it too."""
    from PIL import Image

    blobs = jpegs(64, side=s.p["side"])
    pixels = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]
    rows = []
    for flags, variants in servers:
        # said first, so a server still warming up (compiling) when the budget ends is reported as such
        s.put("starting", {"flags": flags, "at_s": round(time.perf_counter() - START, 1)})
        started = time.perf_counter()
        proc, entry = serve(
            s.model_dir,
            *("--device", s.p["device"], "--dtype", s.p["dtype"], "--max-batch-size", str(s.p["max_batch_size"])),
            *("--max-queue-delay-ms", "5", "--max-queue-wait-s", "0", "--max-queue-size", "65536"),
            *flags,
        )
        ready_s = time.perf_counter() - started
        address = f"127.0.0.1:{entry['port']}"
        try:
            for name, c in [(name, c) for name in variants for c in s.p["concurrency"]]:
                images = pixels if name == "pixels" else blobs
                last = c == max(s.p["concurrency"])
                with GpuSampler() as gpu:
                    cpu0 = tree_cpu_seconds(proc.pid)
                    stats = drive(
                        address,
                        images,
                        c,
                        s.p["client_processes"],
                        s.p["profiled_requests_per_caller" if last else "requests_per_caller"],
                        during=(lambda pid=proc.pid: profile_second(pid, tree=front_ends)) if last else None,
                        own_connections=front_ends,
                        rpc="reward" if name == "reward" else "unary",
                    )
                    cpu = tree_cpu_seconds(proc.pid) - cpu0
                stats.update(
                    variant=name,
                    server_ready_s=ready_s,
                    gpu_util_pct=gpu.mean(),
                    server_cpu_ms_per_image=1000 * cpu / (stats["requests"] * PER_REQUEST),
                )
                rows.append(stats)
                s.put("rows", rows)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def section_serve(s: Section) -> None:
    serve_variants(s, [([], ["exact", "pixels", "reward"]), (["--decode-on-device"], ["decode-on-device"])])


def section_serve_compiled(s: Section) -> None:
    serve_variants(s, [(["--compile"], ["compiled"])])


def section_serve_front_ends(s: Section) -> None:
    serve_variants(s, [(["--front-ends", "2", "--decode-processes"], ["front-ends"])], front_ends=True)


def section_fidelity(s: Section) -> None:
    from pickscore.backends.torch_backend import TorchBackend
    from pickscore.exporter.verify import pairs_ordered_alike
    from pickscore.model.checkpoint import resolve
    from pickscore.model.device_decode import crop_on_device
    from pickscore.model.preprocess import DEFAULT_MAX_PIXELS, load_uint8

    device = s.p["device"]
    sets = best_of_8(s.p["fidelity_sets"], s.p["side"])
    loaded = resolve(s.model_dir)
    cfg = loaded.preprocess
    exact = [np.stack([load_uint8(b, cfg) for b in blobs]) for _, blobs in sets]
    on_device = [np.stack([crop_on_device(b, cfg, device, DEFAULT_MAX_PIXELS) for b in blobs]) for _, blobs in sets]

    def set_scores(backend, crops) -> list[np.ndarray]:
        out = []
        for (caption, _), pixels in zip(sets, crops):
            text = backend.encode_text(backend.tokenizer([caption]))[0]
            out.append(backend.logit_scale * backend.encode_image(pixels) @ text)
        return out

    def compare(candidate: list[np.ndarray], reference: list[np.ndarray]) -> dict[str, float]:
        alike = pairs = ties = same_best = 0
        for a, b in zip(candidate, reference):
            n_alike, n_pairs = pairs_ordered_alike(a, b)
            alike, pairs = alike + n_alike, pairs + n_pairs
            ties += int(sum((a[i] == a[j]) for i in range(len(a)) for j in range(i + 1, len(a))))
            same_best += int(np.argmax(a) == np.argmax(b))
        return {
            "rank_agreement": alike / pairs,
            "same_best": same_best / len(reference),
            "largest_score_difference": float(max(np.abs(a - b).max() for a, b in zip(candidate, reference))),
            "exact_tie_rate": ties / pairs,
            "pairs": pairs,
        }

    scores: dict[str, list[np.ndarray]] = {}
    rows = []
    for dtype in ("fp32", "bf16", "fp16"):
        # loaded afresh for each: the backend casts the model it is given in place (fp16 from bf16 would round twice)
        backend = TorchBackend(resolve(s.model_dir), device=device, dtype=DTYPES[dtype])
        scores[dtype] = set_scores(backend, exact)
        rows.append({"candidate": f"{dtype}, exact decode", **compare(scores[dtype], scores["fp32"])})
        if dtype in ("fp32", s.p["dtype"]):
            decoded = set_scores(backend, on_device)
            rows.append({"candidate": f"{dtype}, decode on device", **compare(decoded, scores["fp32"])})
        s.put("rows", rows)
        del backend
        if device == "cuda":
            torch.cuda.empty_cache()
    s.put("sets", len(sets))


def section_training(s: Section) -> None:
    from dataclasses import replace

    from pickscore.training.config import load_config
    from pickscore.training.loop import Trainer

    device = s.p["device"]
    base = load_config(s.p["train_preset"], {})
    model_ref = None if base.architecture else str(s.model_dir)
    micro = s.p["micro_batches"][0]
    cfg = replace(base, micro_batch=micro, global_batch=micro, warmup_steps=1)
    trainer = Trainer(cfg, model_ref, s.work / "no-data", s.work / "train")
    model_cfg = trainer.loaded.model_cfg
    image_flops, text_flops = model_flops(model_cfg)
    flops_per_pair = 3 * (2 * image_flops + text_flops)  # forward + backward (2x), both images and the prompt
    roofline = s.roofline_flops()
    size = trainer.loaded.preprocess.crop_size
    context = trainer.tokenizer.context_length
    rows = []
    for checkpointing in (True, False):
        trainer.model.set_grad_checkpointing(checkpointing)
        for micro in s.p["micro_batches"]:
            batch = {
                "tokens": torch.randint(1, 49407, (micro, context), device=device),
                "pixels_0": torch.randn(micro, 3, *size, device=device),
                "pixels_1": torch.randn(micro, 3, *size, device=device),
                "label_0": torch.ones(micro, device=device),
                "label_1": torch.zeros(micro, device=device),
                "weight_n": torch.ones(micro, device=device),
            }
            endless = iter(lambda b=batch: (0, b), None)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds = timed(
                    lambda it=endless: trainer.step(it), device, min_s=0, min_iters=s.p["train_steps"], warmup=1
                )
            except torch.OutOfMemoryError:
                trainer.optimizer.zero_grad(set_to_none=True)
                rows.append({"grad_checkpointing": checkpointing, "micro_batch": micro, "fits": False})
                s.put("rows", rows)
                del batch, endless
                torch.cuda.empty_cache()
                break
            rate = micro / seconds
            rows.append(
                {
                    "grad_checkpointing": checkpointing,
                    "micro_batch": micro,
                    "fits": True,
                    "samples_per_s": rate,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
                    "mfu": rate * flops_per_pair / roofline if roofline else None,
                }
            )
            s.put("rows", rows)
    s.put("precision", cfg.precision)


RUNNERS: dict[str, Callable[[Section], None]] = {
    "model": section_model,
    "roofline": section_roofline,
    "tower": section_tower,
    "serve": section_serve,
    "fidelity": section_fidelity,
    "training": section_training,
    "tower-compiled": section_tower_compiled,
    "serve-compiled": section_serve_compiled,
    "serve-front-ends": section_serve_front_ends,
}


# -- the parent: budgets, reports -------------------------------------------------------------------------------


def run_sections(args, profile: dict[str, Any], work: Path) -> dict[str, Any]:
    column = 1 if args.cpu_smoke else 0
    planned = {name: BUDGETS[name][column] for name in SECTIONS if name in args.sections}
    scale = args.budget_s / sum(planned.values()) if args.budget_s else 1.0
    planned = {name: args.budget.get(name, scale * seconds) for name, seconds in planned.items()}
    deadline = time.monotonic() + sum(planned.values())
    report: dict[str, Any] = {}
    for name, seconds in planned.items():
        allowed = min(seconds, deadline - time.monotonic())
        entry: dict[str, Any] = {"budget_s": round(allowed, 1)}
        if "model" in report and report["model"]["status"] != "ok":
            entry["status"] = "skipped: no model"
        elif allowed < 1:
            entry["status"] = "skipped: the whole budget is spent"
        else:
            print(f"== {name} (budget {allowed:.0f} s)", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--section", name, "--work", str(work)]
            cmd += ["--cpu-smoke"] if args.cpu_smoke else []
            env = dict(os.environ)
            if args.cpu_smoke and name.endswith("-compiled"):
                # inductor takes minutes on a 2-core CPU: the smoke runs the compiled code path, torch.compile off
                env["TORCH_COMPILE_DISABLE"] = "1"
                entry["note"] = "TORCH_COMPILE_DISABLE=1 in --cpu-smoke"
            start = time.monotonic()
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: a kill takes its servers
            try:
                code = proc.wait(timeout=allowed)
                entry["status"] = "ok" if code == 0 else f"failed: exit {code} (its log above)"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                entry["status"] = "over budget: killed, partial results"
            entry["seconds"] = round(time.monotonic() - start, 1)
        path = work / f"{name}.json"
        entry["results"] = json.loads(path.read_text()) if path.is_file() else {}
        report[name] = entry
    return report


def device_info(profile: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {"machine": machine(), "torch": torch.__version__, "commit": git_revision()}
    if profile["device"] == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
    return info


def fmt(value: Any, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict[str, Any], info: dict[str, Any], profile: dict[str, Any]) -> str:
    out = [
        f"Device: {info.get('gpu', 'CPU (smoke)')}, driver {info.get('driver', '-')}, CUDA {info.get('cuda', '-')}, "
        f"torch {info['torch']}, commit {info['commit']}. Shape {profile['shape']} (random weights), "
        f"{profile['dtype']}.",
        "",
        "| section | status | seconds / budget |",
        "|---|---|---:|",
    ]
    for name, e in report.items():
        status, last = e["status"], e["results"].get("starting")
        if status.startswith("over budget") and last:
            status += (
                f"; last step: a server with {' '.join(last['flags']) or 'default flags'} started at {last['at_s']} s"
            )
        out.append(f"| {name} | {status} | {fmt(e.get('seconds'))} / {e['budget_s']:.0f} |")
    r = {name: e["results"] for name, e in report.items()}
    if r.get("roofline", {}).get("flops_per_s"):
        m = r["roofline"]["matmul"]
        out += [
            "",
            f"Roofline: {m['n']}³ {m['dtype']} matrix product, {r['roofline']['flops_per_s'] / 1e12:.3g} TFLOP/s.",
        ]
    if r.get("model", {}).get("flops"):
        out.append(f"Image tower: {r['model']['flops']['image'] / 1e9:.4g} GFLOPs per image.")
    for name in ("tower", "tower-compiled"):
        if r.get(name, {}).get("rows"):
            out += ["", f"**{name}**", "", "| batch | images/s | of roofline | first call s |", "|---:|---:|---:|---:|"]
            for row in sorted(r[name]["rows"], key=lambda x: x["batch"]):
                out.append(
                    f"| {row['batch']} | {row['images_per_s']:.0f} | {fmt(row['of_roofline'], '.0%')} "
                    f"| {row['first_call_s']:.1f} |"
                )
    rows = [x for name in SERVE_SECTIONS for x in r.get(name, {}).get("rows", [])]
    if rows:
        out += [
            "",
            f"**serve** (best-of-8 {profile['side']} px JPEGs; max batch {profile['max_batch_size']})",
            "",
            "| variant | concurrency | images/s | p50 ms | p99 ms | GPU util % | server CPU ms/image | profile "
            "(busy threads; share of samples) |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in rows:
            prof = row.get("profile")
            if isinstance(prof, dict):
                shares = ", ".join(f"{k} {v:.0%}" for k, v in prof["share"].items())
                prof = f"{prof['busy_threads']:.1f}; {shares}"
            out.append(
                f"| {row['variant']} | {row['concurrency']} | {row['images_per_s']:.0f} | {row['p50_ms']:.0f} "
                f"| {row['p99_ms']:.0f} | {fmt(row['gpu_util_pct'])} | {row['server_cpu_ms_per_image']:.2f} "
                f"| {prof or ''} |"
            )
    if r.get("fidelity", {}).get("rows"):
        out += [
            "",
            f"**fidelity** against fp32 with the exact decode ({r['fidelity'].get('sets', '?')} best-of-8 sets)",
            "",
            "| candidate | rank agreement | same best | largest score difference | exact ties |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in r["fidelity"]["rows"]:
            out.append(
                f"| {row['candidate']} | {row['rank_agreement']:.4f} | {row['same_best']:.3f} "
                f"| {row['largest_score_difference']:.4f} | {row['exact_tie_rate']:.4f} |"
            )
    if r.get("training", {}).get("rows"):
        out += [
            "",
            f"**training** ({profile['train_preset']} step, {r['training'].get('precision', '?')})",
            "",
            "| grad checkpointing | micro batch | samples/s | peak GiB | MFU |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in r["training"]["rows"]:
            if not row["fits"]:
                out.append(
                    f"| {'on' if row['grad_checkpointing'] else 'off'} | {row['micro_batch']} | out of memory | | |"
                )
                continue
            out.append(
                f"| {'on' if row['grad_checkpointing'] else 'off'} | {row['micro_batch']} | {row['samples_per_s']:.1f} "
                f"| {fmt(row['peak_gib'], '.1f')} | {fmt(row['mfu'], '.0%')} |"
            )
    return "\n".join(out)


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = {name: e["results"] for name, e in report.items()}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for name in ("tower", "tower-compiled"):
        rows = sorted(r.get(name, {}).get("rows", []), key=lambda x: x["batch"])
        if rows:
            ax.plot([x["batch"] for x in rows], [x["images_per_s"] for x in rows], marker="o", label=name)
    roof, flops = r.get("roofline", {}).get("flops_per_s"), r.get("model", {}).get("flops", {}).get("image")
    if roof and flops:
        ax.axhline(roof / flops, color="grey", linestyle="--", label="roofline")
    ax.set(xscale="log", xlabel="batch", ylabel="images/s", title="image tower")
    ax.legend()
    ax = axes[1]
    rows = [x for name in SERVE_SECTIONS for x in r.get(name, {}).get("rows", [])]
    labels = [f"{x['variant']}\nc={x['concurrency']}" for x in rows]
    ax.bar(range(len(rows)), [x["images_per_s"] for x in rows])
    for i, x in enumerate(rows):
        ax.annotate(f"p99 {x['p99_ms']:.0f} ms", (i, x["images_per_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set(ylabel="images/s", title="pickscore serve, best-of-8 JPEGs")
    ax = axes[2]
    for checkpointing in (True, False):
        rows = [
            x for x in r.get("training", {}).get("rows", []) if x["fits"] and x["grad_checkpointing"] == checkpointing
        ]
        if rows:
            label = f"grad checkpointing {'on' if checkpointing else 'off'}"
            ax.plot([x["micro_batch"] for x in rows], [x["samples_per_s"] for x in rows], marker="o", label=label)
    ax.set(xscale="log", xlabel="micro batch", ylabel="pairs/s", title="training step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--out", type=Path, help="directory for gpu-run.json, gpu-run.md and gpu-run.png (required)")
    p.add_argument(
        "--cpu-smoke", action="store_true", help="every section with tiny shapes on the CPU (under a minute)"
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, in this order: {','.join(SECTIONS)} (default all; model is needed "
        "by the rest)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=0,
        help=f"seconds for the whole run, shared out as the default budgets are (default "
        f"{sum(b[0] for b in BUDGETS.values())} on a GPU, {sum(b[1] for b in BUDGETS.values())} in the smoke)",
    )
    p.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="SECTION=SECONDS",
        help="one section's own budget in seconds, instead of its default (repeatable), e.g. "
        "serve-compiled=120 on a GPU whose compiler is slow",
    )
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument(
        "--append-from",
        type=Path,
        metavar="DIR",
        help="run nothing: append the run in DIR/gpu-run.json (made on another machine) to benchmarks/RESULTS.md",
    )
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # internal: run one section
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)  # internal: the run's work directory
    args = p.parse_args(argv)
    profile = PROFILES["smoke" if args.cpu_smoke else "gpu"]
    if args.section:
        RUNNERS[args.section](Section(args.work, args.section, profile))
        return 0
    if args.append_from:
        run = json.loads((args.append_from / "gpu-run.json").read_text())
        report_results(run["device"], run["profile"], run["sections"], None, run["command"], append=True)
        return 0
    if args.out is None:
        p.error("--out DIR is required")
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}: choose from {','.join(SECTIONS)}")
    try:
        args.budget = {name: float(seconds) for name, seconds in (b.split("=", 1) for b in args.budget)}
    except ValueError:
        p.error("--budget takes SECTION=SECONDS, e.g. serve=200")
    if set(args.budget) - set(SECTIONS):
        p.error(f"--budget: unknown sections {sorted(set(args.budget) - set(SECTIONS))}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device here: run on a GPU machine, or --cpu-smoke to check the script on the CPU")
    info = device_info(profile)
    with tempfile.TemporaryDirectory(prefix="gpu-run-") as tmp:
        report = run_sections(args, profile, Path(tmp))
    command = "python benchmarks/gpu_run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report_results(info, profile, report, args.out, command, append=not args.no_append)
    return 0


def report_results(info: dict, profile: dict, sections: dict, out: Path | None, command: str, append: bool) -> None:
    """Write gpu-run.json/.md/.png into ``out`` (when given), print the markdown, and (``append``) add it to
    RESULTS.md under the command that made it."""
    text = markdown(sections, info, profile)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        run = {"device": info, "profile": profile, "sections": sections, "command": command}
        (out / "gpu-run.json").write_text(json.dumps(run, indent=2))
        (out / "gpu-run.md").write_text(text + "\n")
        plot(sections, out / "gpu-run.png")
    print(text)
    if append:
        append_results(
            f"GPU run ({info.get('gpu', 'CPU smoke')})", text, {"machine": info["machine"], "command": command}
        )


if __name__ == "__main__":
    sys.exit(main())
