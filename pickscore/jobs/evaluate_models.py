"""``pickscore evaluate-models``: compare text-to-image models by PickScore, as the paper does (Kirstain et al.
2023, sections 4-5).

    pickscore evaluate-models --model demo --prompts gens/prompts.txt --images gens/generator-* --out report

Every model's images for one set of prompts (``datasets.prompts``, ``datasets.image_sets``) are scored with
PickScore (in this process, or on a server), one call per prompt, and the scores become the statistics of
``model_stats``; ``model_report`` renders them. A prompt for which none of a model's images could be scored is left
out of that model's statistics and of its games; bad images are skipped and listed, never fatal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pickscore.datasets.image_sets import ImageSet, load_image_set, parse_image_set
from pickscore.datasets.prompts import Prompt, read_prompts
from pickscore.errors import InvalidInput, item_reason
from pickscore.jobs.model_stats import json_number, summarize
from pickscore.places import Place, place_from_args


def evaluate_models(args: argparse.Namespace) -> dict[str, Any]:
    """Read, score and summarise as the subcommand's ``args`` say -> the report (what report.json holds)."""
    prompts = read_prompts(args.prompts)
    sets = _image_sets(args.images, prompts)
    with place_from_args(args) as place:
        scores, skipped = score_image_sets(prompts, sets, place)
        scorer = place.name
    return {
        "scorer": scorer,
        "prompts_file": str(args.prompts),
        **summarize(scores, args.best_of, args.bootstrap, args.seed),
        "inputs": {s.name: str(s.path) for s in sets},
        "skipped": skipped,
        "per_prompt": [
            {
                "index": p.index,
                **({"id": p.id} if p.id is not None else {}),
                "prompt": p.text,
                "best": {name: json_number(max(scores[name][p.index], default=np.nan)) for name in scores},
            }
            for p in prompts
        ],
    }


def _image_sets(specs: Sequence[str], prompts: Sequence[Prompt]) -> list[ImageSet]:
    """``--images`` (NAME=PATH or PATH each) -> every model's images, the names told apart."""
    named = [parse_image_set(text) for text in specs]
    names = [name for name, _ in named]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInput(f"--images: the name {repeated[0]!r} is given twice (use NAME=PATH to name them apart)")
    return [load_image_set(name, path, prompts) for name, path in named]


def score_image_sets(
    prompts: Sequence[Prompt], sets: Sequence[ImageSet], place: Place, progress: bool = True
) -> tuple[dict[str, list[list[float]]], list[dict[str, Any]]]:
    """Score every model's images prompt by prompt, wherever ``place`` scores (one call per prompt: its text is
    encoded once) ->
    (name -> per-prompt scores of the images that could be scored, the skipped images with their reasons)."""
    scores: dict[str, list[list[float]]] = {s.name: [] for s in sets}
    skipped: list[dict[str, Any]] = []
    for prompt in tqdm(prompts, unit="prompt", disable=not progress or None, file=sys.stderr):
        batch: list[tuple[str, str, Path | bytes]] = []  # (model, label, image)
        for s in sets:
            for label, load in s.per_prompt[prompt.index]:
                image = load()
                if image is None:
                    skipped.append(_skip(s.name, prompt, label, "no image (null)"))
                else:
                    batch.append((s.name, label, image))
        images = [image for _, _, image in batch]
        values, errors = place.score_all(prompt.text, images, skip_invalid=True) if batch else (np.zeros(0), {})
        for s in sets:
            scores[s.name].append([])
        for k, (model, label, _) in enumerate(batch):
            if k in errors or not np.isfinite(values[k]):
                reason = item_reason(errors.get(k, "not scored"))  # the label names the image
                skipped.append(_skip(model, prompt, label, reason))
            else:
                scores[model][-1].append(float(values[k]))
    for name, per_prompt in scores.items():
        if not any(per_prompt):
            raise InvalidInput(f"--images {name}: none of its images could be scored; first: {_first(skipped, name)}")
    return scores, skipped


def _skip(model: str, prompt: Prompt, label: str, reason: str) -> dict[str, Any]:
    return {"model": model, "prompt_index": prompt.index, "image": label, "error": reason}


def _first(skipped: list[dict[str, Any]], model: str) -> str:
    item = next((s for s in skipped if s["model"] == model), None)
    return "-" if item is None else f"{item['image']}: {item['error']}"
