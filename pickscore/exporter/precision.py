"""Which precision to serve a model in, on this machine: each path's speed beside its rank agreement with fp32.

    compare_paths("./PickScore_v1", ["bf16", "./PickScore_v1-int8"], device="cpu")

Lower precisions change scores, so the fastest path is worth taking only where it keeps the order fp32 gives best-of-8
sets; the export check measures that (``verify.rank_agreement``) and this runs the same measurement for torch's
dtypes and for exports already written, on the user's own model and machine (README, "Which path on which CPU").
Speed is the towers' own, in this process: each path scores the same sets of drawn scenes (with the default 8, the
export check's own) once, timed after the first, so a path's images/s and agreement come from the same forward
passes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from pickscore.backends import Backend, load_backend
from pickscore.backends.manifest import is_export
from pickscore.backends.torch_backend import TORCH_DTYPES
from pickscore.exporter.verify import PER_SET, SETS, agreement, set_scores, verification_inputs
from pickscore.resources import cpu_features, cpu_path


def default_candidates(device: str) -> list[str]:
    """bf16 on a CPU (fp16 matrix units are rare there, and emulated fp16 is slower than fp32); bf16 and fp16 on a
    GPU."""
    return ["bf16", "fp16"] if device.startswith("cuda") else ["bf16"]


def compare_paths(
    model: str,
    candidates: Sequence[str],
    device: str = "cpu",
    sets: int = SETS,
    min_agreement: float = 0.99,
    progress: bool = False,
) -> dict[str, Any]:
    """Torch fp32 and each candidate (a torch dtype, "bf16" or "fp16", run on ``device``; or the directory of an
    ONNX export) over ``sets`` best-of-8 sets (at least 2: the first warms up, the rest are timed) ->
    {"paths": [{path, serve, images_per_s, over_fp32, rank_agreement, max_score_diff, keeps_ranking}],
    "fastest": the fastest path that keeps ``min_agreement`` (fp32 always does), "cpu": the CPU's model, matrix
    flags and the path they suggest}. ValueError naming a candidate that is neither."""
    for c in candidates:
        if c in ("fp32", "auto") or (c not in TORCH_DTYPES and not is_export(c)):
            lower = ", ".join(d for d in TORCH_DTYPES if d != "fp32")
            raise ValueError(
                f"{c!r}: a candidate is a torch dtype below fp32 ({lower}) or the directory of an ONNX export "
                "(pickscore export onnx); fp32 is always measured, as the reference"
            )
    from tqdm import tqdm

    reference = load_backend(model, device=device, dtype="fp32")
    pixels, tokens = verification_inputs(reference.preprocess, reference.tokenizer, sets * PER_SET)
    rows, baseline = [], None
    for c in tqdm(["fp32", *candidates], unit="path", disable=not progress or None, file=sys.stderr):
        backend, path, serve = _load(model, c, device, reference)
        rate, scores = _measure(backend, pixels, tokens)
        baseline = baseline or scores  # fp32's, measured first
        rows.append(
            {
                "path": path,
                "serve": serve,
                "images_per_s": rate,
                "rank_agreement": agreement(scores, baseline),
                "max_score_diff": max(float(abs(a - b).max()) for a, b in zip(scores, baseline)),
            }
        )
    features = cpu_features()
    return {
        "model": model,
        "device": device,
        "sets": sets,
        "min_agreement": min_agreement,
        "paths": rows,
        "fastest": fastest_kept(rows, min_agreement),
        "cpu": {"model": features.model, "flags": sorted(features.flags), "suggested": cpu_path(features.flags)},
    }


def fastest_kept(rows: list[dict[str, Any]], min_agreement: float) -> str:
    """Marks each path's speed over the first (fp32's) and whether it keeps ``min_agreement`` -> the name of the
    fastest path that does."""
    for r in rows:
        r["over_fp32"] = r["images_per_s"] / rows[0]["images_per_s"]
        r["keeps_ranking"] = r["rank_agreement"] >= min_agreement
    return max((r for r in rows if r["keeps_ranking"]), key=lambda r: r["images_per_s"])["path"]


def _load(model: str, candidate: str, device: str, reference: Backend) -> tuple[Backend, str, str]:
    """-> (the candidate's backend, its name in the table, the command that serves it)."""
    if candidate == "fp32":
        return reference, "torch fp32", f"pickscore serve --model {model} --dtype fp32"
    if candidate in TORCH_DTYPES:
        backend = load_backend(model, device=device, dtype=candidate)
        return backend, f"torch {candidate}", f"pickscore serve --model {model} --dtype {candidate}"
    backend = load_backend(candidate)
    return backend, f"{backend.name} {backend.precision} ({candidate})", f"pickscore serve --model {candidate}"


def _measure(backend: Backend, pixels, tokens) -> tuple[float, list]:
    """Every set's scores; the first set warms up, the others are timed -> (images/s, scores)."""
    first = set_scores(backend, pixels[:PER_SET], tokens[:1])
    start = time.perf_counter()
    rest = set_scores(backend, pixels[PER_SET:], tokens[1:])
    return (len(pixels) - PER_SET) / (time.perf_counter() - start), first + rest


def report(result: dict[str, Any]) -> str:
    """The comparison as a table a person reads, the fastest path that keeps ranking marked, and how to serve it."""
    cpu = result["cpu"]
    lines = [
        f"model {result['model']} on {result['device']}; {result['sets']} best-of-{PER_SET} sets of drawn scenes",
        f"CPU: {cpu['model']}; matrix flags: {', '.join(cpu['flags']) or 'none'}; "
        f"its flags suggest {cpu['suggested']} (README, 'Which path on which CPU')",
        "",
        "| path | images/s | × fp32 | rank agreement | largest score difference | keeps ranking |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["paths"]:
        mark = " (fastest that keeps ranking)" if r["path"] == result["fastest"] else ""
        lines.append(
            f"| {r['path']}{mark} | {r['images_per_s']:.1f} | {r['over_fp32']:.2f} | {r['rank_agreement']:.3f} | "
            f"{r['max_score_diff']:.3g} | {'yes' if r['keeps_ranking'] else 'no'} |"
        )
    fastest = next(r for r in result["paths"] if r["path"] == result["fastest"])
    lines += ["", f"serve it: {fastest['serve']}"]
    return "\n".join(lines)
