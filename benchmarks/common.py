"""Shared benchmark helpers: model shapes with random weights, JPEG workloads, latency statistics, reports."""

from __future__ import annotations

import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from load import PER_REQUEST, closed_loop, latency_stats, prompts, reward_sender, score_sender  # noqa: F401 (re-exported)
from PIL import Image

from pickscore.model import architecture, checkpoint, hf_convert
from pickscore.model.preprocess import PreprocessConfig
from pickscore.model.tokenizer import save_hf_files

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# transformers CLIPConfig fields of the shapes we benchmark (random weights; speed does not depend on them).
SHAPES = {
    # Towers that cost almost nothing: what the server sustains with it is the request path's own ceiling.
    "tiny": dict(
        projection_dim=16,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=32,
            image_size=224,
        ),
    ),
    "vit-b-32": dict(
        projection_dim=512,
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=32,
            image_size=224,
        ),
    ),
    "vit-h-14": dict(
        projection_dim=1024,
        text_config=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"
        ),
        vision_config=dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
            hidden_act="gelu",
        ),
    ),
}


def write_model(shape: str, directory: Path, seed: int = 0) -> Path:
    """A Hugging Face CLIP directory of ``shape`` with random weights, in the PickScore_v1 layout."""
    return write_clip(SHAPES[shape], directory, seed)


def write_clip(cfg: dict, directory: Path, seed: int = 0) -> Path:
    """A transformers CLIPModel of ``cfg`` (text_config, vision_config, projection_dim) with random weights, saved in
    the PickScore_v1 layout: weights, tokenizer, CLIP-H preprocessing."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(
            text_config=cfg["text_config"], vision_config=cfg["vision_config"], projection_dim=cfg["projection_dim"]
        )
    ).eval()
    model.save_pretrained(directory)
    save_hf_files(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(PreprocessConfig().to_hf()))
    return directory


def write_open_clip_model(shape: str, directory: Path, device: str = "cpu", seed: int = 0) -> Path:
    """``shape`` with random weights in this project's own (open_clip) layout, built by ``pickscore.model`` alone:
    no transformers, so it runs where only torch is installed (the GPU machines). ``device`` draws the weights
    there (a GPU draws ViT-H-14's 986 M in a second; written as fp32 either way)."""
    cfg = hf_convert.model_config(SHAPES[shape])
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint.write_model(architecture.build(cfg, device), cfg, PreprocessConfig(), directory)
    return directory


def jpegs(n: int, side: int = 512, seed: int = 0) -> list[bytes]:
    """``n`` distinct side x side JPEGs with photo-like smooth content (quality 90)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = (rng.random((side // 16, side // 16, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def best_of_8(sets: int, side: int, seed: int = 0) -> list[tuple[str, list[bytes]]]:
    """``sets`` (caption, 8 JPEGs) of drawn scenes: the scene itself, then scenes changing 1-5 of its attributes."""
    from pickscore.scenes import ATTRIBUTES, random_scene, render, vary

    rng = random.Random(seed)
    out = []
    for _ in range(sets):
        scene = random_scene(rng)
        blobs = []
        for k in range(PER_REQUEST):
            candidate = vary(scene, rng.randint(1, len(ATTRIBUTES)), rng) if k else scene
            buf = io.BytesIO()
            render(candidate, side, rng).save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
        out.append((scene.caption, blobs))
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import os

    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def machine_with_flags() -> str:
    """``machine()`` (CPU model, cores, GPU, torch), the usable cores and which matrix-unit flags the CPU has."""
    from pickscore.resources import MATRIX_FLAGS, cpu_features, usable_cores

    flags = cpu_features().flags
    have = [f for f in MATRIX_FLAGS if f in flags]
    missing = [f for f in MATRIX_FLAGS if f not in flags]
    return f"{machine()}, {usable_cores()} usable; CPU flags: {', '.join(have) or 'none'} (no {', '.join(missing)})"


def serve(model_dir: Path, *flags: str, on_line=None) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start `pickscore serve` on loopback (free ports) -> the process and its "serving" log entry (port,
    http_port, metrics_port, ...). Each later log line goes to ``on_line`` when given. The caller terminates the
    process."""
    import sys
    import threading

    cmd = [sys.executable, "-m", "pickscore.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1"]
    cmd += ["--port", "0", "--http-port", "0", "--metrics-port", "0", "--log-format", "json", *flags]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("message") == "serving":
            threading.Thread(target=_drain, args=(proc.stderr, on_line), daemon=True).start()
            return proc, entry
    raise RuntimeError(f"server exited with {proc.wait()} before serving")


def _drain(pipe, on_line) -> None:
    """Read ``pipe`` to its end (so the server never blocks on a full pipe), each line to ``on_line`` if given."""
    for line in pipe:
        if on_line is not None:
            on_line(line)


def descendants(pid: int) -> list[int]:
    """``pid`` and every living process below it (decode workers, multiprocessing's resource tracker), from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return out


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """utime + stime of each process still there, in seconds, from /proc/PID/stat."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[p] = (int(fields[11]) + int(fields[12])) / tick  # fields 14 and 15 of stat(5), after pid and comm
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its living descendants; 0 when it is gone."""
    return sum(cpu_seconds(descendants(pid)).values())


def py_spy() -> str | None:
    """The py-spy executable: on PATH, beside this Python, or in the bin/ of a PYTHONPATH entry (pip --target)."""
    places = [Path(sys.executable).parent] + [Path(p) / "bin" for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    return shutil.which("py-spy") or next((str(d / "py-spy") for d in places if (d / "py-spy").is_file()), None)


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_outputs(out: Path, stem: str, results: dict[str, Any], markdown, plot=None) -> str:
    """A benchmark's outputs: OUT/STEM.json (``results``), OUT/STEM.md (``markdown(results)``, also printed) and,
    with ``plot(results, path)``, OUT/STEM.png. -> the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / f"{stem}.md").write_text(table)
    if plot is not None:
        plot(results, out / f"{stem}.png")
    print(table)
    return table


def append_results(title: str, markdown: str, meta: dict[str, Any]) -> None:
    """Append a dated section to benchmarks/RESULTS.md."""
    header = (
        f"\n## {title} — {time.strftime('%Y-%m-%d')}, {git_revision()}\n\nMachine: {meta['machine']}. "
        f"Command: `{meta['command']}`\n\n"
    )
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section is appended by a script in benchmarks/; newest last.\n")
    with RESULTS.open("a") as f:
        f.write(header + markdown + "\n")
