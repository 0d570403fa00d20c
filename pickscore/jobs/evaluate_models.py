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
from pickscore.places import Place, model_names, place_from_args


def evaluate_models(args: argparse.Namespace) -> dict[str, Any]:
    """Read, score and summarise as the subcommand's ``args`` say -> the report (what report.json holds).

    With several ``--model-name`` (on ``--server``), every image is scored by each of the servers' models in one
    request (``several_models``), and the report holds each scorer's statistics side by side under ``scorers``:
    the same images, the same prompts, the same skipped images, for each scoring function."""
    prompts = read_prompts(args.prompts)
    sets = _image_sets(args.images, prompts)
    names = model_names(args.model_name) if getattr(args, "server", None) else []
    if len(names) > 1:
        from pickscore.jobs.several_models import ModelsOnServers
        from pickscore.tls import connection

        servers = args.server.split(",")
        with ModelsOnServers(servers, args.timeout, connection(args), names, args.expect_model) as place:
            by_scorer, skipped = score_image_sets(prompts, sets, place, columns=len(names))
            scorers, identities = place.scorer_names(), place.identities
    else:
        with place_from_args(args) as place:
            by_scorer, skipped = score_image_sets(prompts, sets, place)
            scorers, identities = [place.name], place.identities
    summaries = [summarize(scores, args.best_of, args.bootstrap, args.seed) for scores in by_scorer]
    several = names if len(names) > 1 else None
    if several is None:  # one scorer: its statistics at the top, as ever
        head = {"scorer": scorers[0], "prompts_file": str(args.prompts), **summaries[0]}
    else:
        side_by_side = [{"model_name": n, "scorer": s, **summary} for n, s, summary in zip(names, scorers, summaries)]
        head = {"prompts_file": str(args.prompts), "prompts": len(prompts), "scorers": side_by_side}
    return {
        **head,
        "model_identity": identities,
        "inputs": {s.name: str(s.path) for s in sets},
        "skipped": skipped,
        "per_prompt": _per_prompt(prompts, by_scorer, several),
    }


def _per_prompt(
    prompts: Sequence[Prompt], by_scorer: list[dict[str, list[list[float]]]], names: list[str] | None
) -> list[dict[str, Any]]:
    """Each prompt's best score per text-to-image model (by scorer's model name when several score)."""

    def best(scores: dict[str, list[list[float]]], index: int) -> dict[str, float | None]:
        return {model: json_number(max(scores[model][index], default=np.nan)) for model in scores}

    return [
        {
            "index": p.index,
            **({"id": p.id} if p.id is not None else {}),
            "prompt": p.text,
            "best": best(by_scorer[0], p.index)
            if names is None
            else {name: best(scores, p.index) for name, scores in zip(names, by_scorer)},
        }
        for p in prompts
    ]


def _image_sets(specs: Sequence[str], prompts: Sequence[Prompt]) -> list[ImageSet]:
    """``--images`` (NAME=PATH or PATH each) -> every model's images, the names told apart."""
    named = [parse_image_set(text) for text in specs]
    names = [name for name, _ in named]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInput(f"--images: the name {repeated[0]!r} is given twice (use NAME=PATH to name them apart)")
    return [load_image_set(name, path, prompts) for name, path in named]


def score_image_sets(
    prompts: Sequence[Prompt], sets: Sequence[ImageSet], place: Place, progress: bool = True, columns: int = 1
) -> tuple[list[dict[str, list[list[float]]]], list[dict[str, Any]]]:
    """Score every model's images prompt by prompt, wherever ``place`` scores (one call per prompt: its text is
    encoded once; ``columns`` scores an image when the place scores with several models) ->
    (per scorer: name -> per-prompt scores of the images that could be scored; the skipped images with their
    reasons). An image is skipped, for every scorer, when it fails or any scorer's score is not finite."""
    scores: list[dict[str, list[list[float]]]] = [{s.name: [] for s in sets} for _ in range(columns)]
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
        values = np.asarray(values).reshape(len(batch), columns)
        for by_model in scores:
            for s in sets:
                by_model[s.name].append([])
        for k, (model, label, _) in enumerate(batch):
            if k in errors or not np.isfinite(values[k]).all():
                reason = item_reason(errors.get(k, "not scored"))  # the label names the image
                skipped.append(_skip(model, prompt, label, reason))
                continue
            for by_model, value in zip(scores, values[k]):
                by_model[model][-1].append(float(value))
    for name, per_prompt in scores[0].items():
        if not any(per_prompt):
            raise InvalidInput(f"--images {name}: none of its images could be scored; first: {_first(skipped, name)}")
    return scores, skipped


def _skip(model: str, prompt: Prompt, label: str, reason: str) -> dict[str, Any]:
    return {"model": model, "prompt_index": prompt.index, "image": label, "error": reason}


def _first(skipped: list[dict[str, Any]], model: str) -> str:
    item = next((s for s in skipped if s["model"] == model), None)
    return "-" if item is None else f"{item['image']}: {item['error']}"
