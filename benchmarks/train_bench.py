"""Training throughput and memory per preset: what one optimizer step costs on this machine.

    python benchmarks/train_bench.py                                   # tiny and demo presets (CPU)
    python benchmarks/train_bench.py --presets pickscore-clip-h        # GPU: ViT-H-14 shape, bf16, grad checkpointing

Each preset trains for --steps optimizer steps on synthetic pairs drawn at its image size, through the
same loop as `pickscore train` (AdamW, its precision, batch sizes and checkpointing), in this process.
Reported: median samples/s over the steps after --warmup-steps (the loop's own per-step figure), the
peak resident memory of the process, and on CUDA the peak allocated GPU memory. `pickscore-clip-h`
starts from random weights of the ViT-H-14 shape (986 M parameters; needs a GPU with ~40 GB at its
micro-batch 16). Writes JSON and markdown under --out and appends to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, machine, write_model  # noqa: E402

from pickscore.training.config import load_config, preset_names  # noqa: E402
from pickscore.training.loop import train  # noqa: E402
from pickscore.training.synthetic import write_synthetic  # noqa: E402

# Presets without an architecture fine-tune a checkpoint: benchmark them on this random-weight shape.
CHECKPOINT_SHAPE = {"pickscore-clip-h": ("vit-h-14", 224)}


def measure(preset: str, steps: int, warmup: int, work: Path) -> dict:
    cfg = load_config(preset, {})
    cfg = replace(cfg, max_steps=steps, warmup_steps=1, eval_every=steps + 1, save_every=steps + 1, eval_pairs=8)
    if preset in CHECKPOINT_SHAPE:
        shape, image_size = CHECKPOINT_SHAPE[preset]
        model_ref = str(write_model(shape, work / "model"))
    else:
        model_ref, image_size = None, cfg.architecture["vision_cfg"]["image_size"]
    data = work / "data"
    write_synthetic(data, pairs=max(cfg.global_batch * (steps + 2), 200), seed=0, image_size=image_size)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    print(f"training {preset}: {steps} steps of {cfg.global_batch} pairs", file=sys.stderr)
    train(cfg, model_ref, data, work / "run")
    log = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in log[warmup:]]
    return {
        "preset": preset,
        "precision": cfg.precision,
        "grad_checkpointing": cfg.grad_checkpointing,
        "global_batch": cfg.global_batch,
        "micro_batch": cfg.micro_batch,
        "image_size": image_size,
        "steps_measured": len(rates),
        "samples_per_s": statistics.median(rates),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| preset | precision | grad ckpt | global / micro batch | image px | samples/s (median) | peak RSS GiB "
        "| peak GPU GiB |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        gpu = "-" if r["peak_cuda_gib"] is None else f"{r['peak_cuda_gib']:.1f}"
        lines.append(
            f"| {r['preset']} | {r['precision']} | {'on' if r['grad_checkpointing'] else 'off'} | "
            f"{r['global_batch']} / {r['micro_batch']} | {r['image_size']} | {r['samples_per_s']:.1f} | "
            f"{r['peak_rss_gib']:.2f} | {gpu} |"
        )
    return "\n".join(lines) + (
        "\n\nPeak RSS is the process's high-water mark so far, so a preset measured after a "
        "larger one reports at least that one's figure: put the smallest first."
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--presets",
        nargs="+",
        default=["tiny", "demo"],
        choices=preset_names(),
        metavar="NAME",
        help=f"presets to measure, in order: {', '.join(preset_names())} (default: tiny demo)",
    )
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per preset (default 30)")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the median (default 5)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for JSON and markdown")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.steps <= args.warmup_steps:
        p.error("--steps must exceed --warmup-steps")
    rows = []
    for preset in args.presets:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(preset, args.steps, args.warmup_steps, Path(tmp)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = to_markdown(rows)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"train-{device}"
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    (args.out / f"{stem}.md").write_text(report + "\n")
    if not args.no_append:
        command = "python benchmarks/train_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_results(f"Training throughput, {device}", report, {"machine": machine(), "command": command.strip()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
